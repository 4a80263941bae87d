"""Qwen2.5-VL processor that accepts the torchvision-free image/video processors."""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor

from surgsigma_train.models.processing import TorchVisionFreeProcessorMixin


class Qwen2_5_VLProcessorTorch(TorchVisionFreeProcessorMixin, Qwen2_5_VLProcessor):
    """transformers' ``Qwen2_5_VLProcessor``, unchanged (token expansion, ``second_per_grid_ts``,
    ``mm_token_type_ids``, replacement offsets).

    Built with ``QwenImageProcessor`` + ``Qwen2VLVideoProcessorTorch``. Saved configs name the stock class, so an
    exported checkpoint loads with plain ``AutoProcessor``.
    """
