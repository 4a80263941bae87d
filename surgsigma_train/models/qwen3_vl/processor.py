"""Qwen3-VL processor that accepts the torchvision-free image/video processors and real frame times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import Qwen3VLProcessor

from surgsigma_train.models.processing import TorchVisionFreeProcessorMixin
from surgsigma_train.models.video_processor import ClipVideoMetadata


def temporal_group_times_s(frame_times_s: Sequence[float], temporal_patch_size: int) -> list[float]:
    """One time per temporal patch: the mean of its first and last frame time.

    The stock rule (``Qwen3VLProcessor._calculate_timestamps``) applied to real times instead of
    ``frames_indices / fps``: the frame list is padded to a multiple of ``temporal_patch_size`` by repeating the
    last frame, as the video processor pads the pixels.
    """
    times = list(frame_times_s)
    if not times:
        raise ValueError("no frame times")
    if len(times) % temporal_patch_size:
        times.extend([times[-1]] * (temporal_patch_size - len(times) % temporal_patch_size))
    last_offset = temporal_patch_size - 1
    return [(times[start] + times[start + last_offset]) / 2 for start in range(0, len(times), temporal_patch_size)]


class Qwen3VLProcessorTorch(TorchVisionFreeProcessorMixin, Qwen3VLProcessor):
    """transformers' ``Qwen3VLProcessor`` (token expansion with frame timestamps, ``mm_token_type_ids``,
    replacement offsets), plus real frame times.

    With ``ClipVideoMetadata`` the ``<t seconds>`` text of each temporal patch comes from its ``timestamps``
    (real presentation times minus ``time_origin_s``, so variable frame rates, jittered sampling and clips inside
    long files are timed correctly); with plain ``VideoMetadata`` everything is the stock code path. For uniform
    frames of a whole constant-rate video (times ``index / fps``, origin 0) both give the same text.

    Built with ``QwenImageProcessor`` + ``Qwen3VLVideoProcessorTorch``. Saved configs name the stock class, so an
    exported checkpoint loads with plain ``AutoProcessor``.
    """

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        metadata = (video_inputs.get("video_metadata") or [None] * (video_idx + 1))[video_idx]
        if not isinstance(metadata, ClipVideoMetadata):
            return super().replace_video_token(video_inputs, video_idx, **kwargs)
        grid_t, grid_h, grid_w = (int(value) for value in video_inputs["video_grid_thw"][video_idx])
        frame_seqlen = grid_h * grid_w // self.video_processor.merge_size**2
        group_times_s = temporal_group_times_s(metadata.timestamps, self.video_processor.temporal_patch_size)
        if len(group_times_s) != grid_t:
            raise ValueError(
                f"video {video_idx}: {len(metadata.timestamps)} frame times make {len(group_times_s)} temporal patches,"
                f" but the video has {grid_t} (one frame time per frame passed)"
            )
        # Same text as the stock processor: "<t seconds>" + one vision start/end pair per temporal patch.
        frame_tokens = self.vision_start_token + self.video_token * frame_seqlen + self.vision_end_token
        return "".join(f"<{time_s:.1f} seconds>" + frame_tokens for time_s in group_times_s)
