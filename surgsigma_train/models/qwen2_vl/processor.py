"""Qwen2-VL processor that accepts the torchvision-free image/video processors."""

from __future__ import annotations

from transformers import Qwen2VLProcessor

from surgsigma_train.models.processing import TorchVisionFreeProcessorMixin


class Qwen2VLProcessorTorch(TorchVisionFreeProcessorMixin, Qwen2VLProcessor):
    """transformers' ``Qwen2VLProcessor``, unchanged (token expansion, ``mm_token_type_ids``, replacement
    offsets).

    Qwen2-VL has no notion of time: video temporal positions advance by one per temporal patch and frame
    times (``ClipVideoMetadata``) are accepted and ignored.

    Built with ``QwenImageProcessor`` + ``Qwen2VLVideoProcessorTorch``. Saved configs name the stock class, so an
    exported checkpoint loads with plain ``AutoProcessor``.
    """
