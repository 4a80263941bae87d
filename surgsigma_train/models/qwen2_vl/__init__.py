"""Qwen2-VL family: model, tiny config, processor, chat template, parameter groups."""

from surgsigma_train.models.qwen2_vl.family import FAMILY

__all__ = ["FAMILY"]
