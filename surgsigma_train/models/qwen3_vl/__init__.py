"""Qwen3-VL family: model, tiny config, processor, chat template, parameter groups."""

from surgsigma_train.models.qwen3_vl.family import FAMILY

__all__ = ["FAMILY"]
