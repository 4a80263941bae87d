"""Qwen3-VL processor that accepts the torchvision-free image/video processors."""

from __future__ import annotations

from transformers import Qwen3VLProcessor

from surgsigma_train.models.processing import TorchVisionFreeProcessorMixin


class Qwen3VLProcessorTorch(TorchVisionFreeProcessorMixin, Qwen3VLProcessor):
    """transformers' ``Qwen3VLProcessor``, unchanged (token expansion with frame timestamps,
    ``mm_token_type_ids``, replacement offsets).

    Built with ``QwenImageProcessor`` + ``Qwen3VLVideoProcessorTorch``. Saved configs name the stock class, so an
    exported checkpoint loads with plain ``AutoProcessor``.
    """
