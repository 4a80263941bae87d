"""Qwen2.5-VL processor that accepts the torchvision-free image/video processors."""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor

from surgsigma_train.models.processing import TorchVisionFreeProcessorMixin


class Qwen2_5_VLProcessorTorch(TorchVisionFreeProcessorMixin, Qwen2_5_VLProcessor):
    """transformers' ``Qwen2_5_VLProcessor``, unchanged (token expansion, ``second_per_grid_ts``,
    ``mm_token_type_ids``, replacement offsets).

    ``second_per_grid_ts`` = ``temporal_patch_size / metadata.sampled_fps`` per video (stock rule). With
    ``ClipVideoMetadata`` that is the real time per temporal patch (``sampled_fps`` is measured from the frame
    times); with plain ``VideoMetadata`` it is the stock value, which is only right when the frames span the whole
    file at a constant rate. Keeping the fix in the metadata makes the stock processor (torchvision machines,
    inference code) compute the same value.

    Built with ``QwenImageProcessor`` + ``Qwen2VLVideoProcessorTorch``. Saved configs name the stock class, so an
    exported checkpoint loads with plain ``AutoProcessor``.
    """
