"""Qwen2.5-VL family: model, tiny config, processor, chat template, parameter groups."""

from surgsigma_train.models.qwen2_5_vl.family import FAMILY

__all__ = ["FAMILY"]
