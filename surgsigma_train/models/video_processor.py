"""Qwen-VL video processors that run without torchvision and match the stock ones exactly.

transformers' ``Qwen2VLVideoProcessor`` (Qwen2-VL, Qwen2.5-VL) and ``Qwen3VLVideoProcessor`` (Qwen3-VL) need
torchvision, and without a video processor the stock Qwen-VL processors cannot be built at all. These classes
reproduce their output (``pixel_values_videos``, ``video_grid_thw`` and, on request, ``video_metadata``) with
plain torch, and subclass transformers' ``BaseVideoProcessor`` so that the stock processors accept them.

Contract (narrower than the stock classes, on purpose):

* input: a list of videos, each a uint8 array/tensor of already-sampled frames, ``frames_THWC`` (or
  ``frames_TCHW``), RGB (a single grey channel is repeated). Frame sampling happens in our data layer, so
  ``do_sample_frames`` must stay False (stock Qwen3-VL defaults to True and would re-sample our frames).
* ``video_metadata`` (one ``VideoMetadata``/dict per video: ``fps`` and ``frames_indices`` of the source video,
  ``total_num_frames``...) is passed through, copied, so that Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's
  frame timestamps come out right and the caller's objects are never mutated. Pass ``ClipVideoMetadata`` (real
  frame times) for clips cut from longer files or variable-frame-rate video: plain ``VideoMetadata`` derives time
  from frame indices, which is wrong there (see its docstring).
* unknown or unsupported options (centre crop, frame sampling, file paths) raise instead of being ignored.

Pixel pipeline, as the stock classes: ``smart_resize`` (family rule) -> bicubic anti-aliased resize on the
uint8 frames (torchvision's tensor path) -> fused rescale/normalise in float32 -> pad the frame count to a
multiple of ``temporal_patch_size`` by repeating the last frame -> Qwen patch layout.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
)
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import (
    VideoMetadata,
    group_videos_by_shape,
    make_batched_metadata,
    make_batched_videos,
    reorder_videos,
)

from surgsigma_train.models.vision_ops import (
    grayscale_to_rgb_like_torchvision,
    interpolation_mode,
    patchify_videos,
    rescale_and_normalize_like_transformers,
    resize_like_torchvision,
)


@dataclass
class ClipVideoMetadata(VideoMetadata):
    """``VideoMetadata`` carrying the real presentation time of every frame given to the processor.

    transformers derives time from frame indices: Qwen3-VL's frame timestamps are ``frames_indices / fps`` and
    Qwen2.5-VL's ``second_per_grid_ts`` is ``temporal_patch_size / sampled_fps`` with ``sampled_fps =
    len(frames_indices) / total_num_frames * fps``. Both assume a constant frame rate, and ``sampled_fps`` also
    assumes the frames span the whole file: 4 frames from a 2 s clip of a 1 h, 30 fps video give 1800 s per
    temporal patch instead of 1 s. This class overrides the two properties with values computed from
    ``frame_times_s``, so every consumer (our processors, the stock ones, other models' processors) gets real time:

    * ``timestamps``: ``frame_times_s - time_origin_s``, the frame times the model is shown (Qwen3-VL text).
      ``time_origin_s`` = the clip start gives clip-relative times, 0 gives times in the source file.
    * ``sampled_fps``: 1 / the mean real interval between consecutive frames, so Qwen2.5-VL's
      ``second_per_grid_ts`` = ``temporal_patch_size`` x that interval = real seconds per temporal patch.
      Intervals, hence ``second_per_grid_ts``, do not depend on ``time_origin_s``.

    ``frames_indices`` stay the source-file indices (for the record); ``total_num_frames`` and ``fps`` describe the
    source file.
    """

    frame_times_s: list[float] | None = None  # presentation time (s) in the source file of each frame, in order
    time_origin_s: float = 0.0  # subtracted from frame_times_s for the times shown to the model

    def __post_init__(self) -> None:
        if self.frame_times_s is None:
            raise ValueError("ClipVideoMetadata needs frame_times_s (use VideoMetadata when they are unknown)")
        self.frame_times_s = [float(time) for time in self.frame_times_s]
        times = self.frame_times_s
        if not times:
            raise ValueError("ClipVideoMetadata.frame_times_s is empty")
        if not all(math.isfinite(time) for time in times) or not math.isfinite(self.time_origin_s):
            raise ValueError(f"frame times must be finite, got {times} with origin {self.time_origin_s}")
        if any(later < earlier for earlier, later in zip(times, times[1:])):
            raise ValueError(f"frame_times_s must be non-decreasing (frames in presentation order), got {times}")
        if times[0] < self.time_origin_s:
            raise ValueError(f"first frame at {times[0]} s is before the time origin {self.time_origin_s} s")
        if self.frames_indices is not None and len(self.frames_indices) != len(times):
            raise ValueError(f"{len(self.frames_indices)} frames_indices but {len(times)} frame_times_s")

    @property
    def timestamps(self) -> list[float]:
        """Time of each frame as shown to the model (seconds from ``time_origin_s``)."""
        return [time - self.time_origin_s for time in self.frame_times_s]  # type: ignore[union-attr]

    @property
    def seconds_per_frame(self) -> float:
        """Mean real interval between consecutive frames; the source frame interval for a single instant."""
        times = self.frame_times_s  # type: ignore[union-attr]
        span_s = times[-1] - times[0]
        if len(times) > 1 and span_s > 0:
            return span_s / (len(times) - 1)
        # One frame (or one instant): no interval to measure. Only temporal index 0 exists then, so the value never
        # reaches a position id; the source frame interval keeps it finite and meaningful in logs.
        return 1.0 / (self.fps or 24)

    @property
    def sampled_fps(self) -> float:
        """Real sampling rate: 1 / ``seconds_per_frame``."""
        return 1.0 / self.seconds_per_frame


class QwenVideoProcessorKwargs(VideosKwargs, total=False):
    """Options of the Qwen-VL video processors (names and meaning as in transformers' classes).

    min_pixels / max_pixels: shorthand for ``size = {"shortest_edge": min, "longest_edge": max}``. For
        Qwen2-VL/Qwen2.5-VL they bound the pixels of ONE frame; for Qwen3-VL they bound the pixels of all frames
        together (its smart_resize multiplies by the frame count).
    cap_pixels_per_frame / max_video_tokens: qwen-vl-utils' extra per-frame cap (off by default, as in
        transformers <= 5.23).
    min_frames / max_frames: only used by frame sampling, accepted so that published configs load.
    """

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int


class QwenVideoProcessor(BaseVideoProcessor):
    """Shared torch-only pipeline; subclasses set the family defaults and the resize rule."""

    # transformers' class whose output this one reproduces (also written into saved configs, so that an exported
    # checkpoint loads with stock transformers).
    stock_class_name: ClassVar[str]

    resample = PILImageResampling.BICUBIC
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = False
    temporal_patch_size = 2
    merge_size = 2
    min_frames = 4
    max_frames = 768
    cap_pixels_per_frame = False
    valid_kwargs = QwenVideoProcessorKwargs
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs: Any) -> None:
        # min_pixels/max_pixels are the historical names of size["shortest_edge"/"longest_edge"]
        size = kwargs.pop("size", None)
        size = dict(self.size) if size is None else dict(size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            size["shortest_edge"] = min_pixels
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            size["longest_edge"] = max_pixels
        size.pop("min_pixels", None)
        size.pop("max_pixels", None)
        if kwargs.get("do_sample_frames"):
            raise ValueError(f"{type(self).__name__} takes pre-sampled frames: do_sample_frames must be False")
        super().__init__(size=size, **kwargs)

    @property
    def backend(self) -> str:
        return "torch"

    # ---- family-specific -------------------------------------------------------------------------------------
    def resized_size(
        self, num_frames: int, height: int, width: int, size: SizeDict | None = None, **overrides: Any
    ) -> tuple[int, int]:
        """(height, width) every frame of such a video is resized to."""
        raise NotImplementedError

    # ---- public helpers --------------------------------------------------------------------------------------
    def resize_frames_THWC(self, frames_THWC: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
        """The resize ``preprocess`` applies (this processor's interpolation, antialiased), on uint8 THWC frames.

        Per frame, so frames resized here and then given to ``preprocess`` at their final size (which it leaves
        alone) give bit-identical patches: the frame cache stores frames resized this way.
        """
        frames_TCHW = torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(0, 3, 1, 2)
        resized_TCHW = resize_like_torchvision(frames_TCHW, size_hw, mode=interpolation_mode(self.resample),
                                               antialias=True)
        return np.ascontiguousarray(resized_TCHW.permute(0, 2, 3, 1).numpy())

    def keeps_size(self, num_frames: int, height: int, width: int, *, min_pixels: int, max_pixels: int) -> bool:
        """Whether ``preprocess`` leaves frames of this size as they are (its resize rule maps the size to itself)."""
        size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
        return tuple(self.resized_size(num_frames, height, width, size=size)) == (height, width)

    def _resize_options(self, size: SizeDict | None, overrides: dict[str, Any]
                        ) -> tuple[SizeDict, int, int, bool, int]:
        """(size, spatial factor, temporal factor, cap_pixels_per_frame, max_video_tokens) for one call: call
        overrides first, then this processor's settings. Shared by both families' resize rules."""
        size = size if size is not None else self._to_size_dict(None, None, None)
        factor = (overrides.get("patch_size") or self.patch_size) * (overrides.get("merge_size") or self.merge_size)
        temporal_factor = overrides.get("temporal_patch_size") or self.temporal_patch_size
        cap = overrides.get("cap_pixels_per_frame", self.cap_pixels_per_frame)
        max_video_tokens = overrides.get("max_video_tokens") or self.max_video_tokens
        return size, factor, temporal_factor, cap, max_video_tokens

    def planned_grid_thw(
        self, num_frames: int, height: int, width: int, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int, int]:
        """(grid_t, grid_h, grid_w) that ``preprocess`` gives a ``num_frames x height x width`` video.

        Same rule and options as the pixel pipeline (this processor's patch/merge sizes and pixel cap; the size
        bounds overridden by ``min_pixels`` / ``max_pixels``). The token planner uses it, so planned and actual
        grids cannot drift apart.
        """
        size = self._to_size_dict(None, min_pixels, max_pixels)
        resized_height, resized_width = self.resized_size(
            num_frames,
            height,
            width,
            size=size,
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
            cap_pixels_per_frame=self.cap_pixels_per_frame,
            max_video_tokens=self.max_video_tokens,
        )
        grid_t = -(-num_frames // self.temporal_patch_size)  # frames are padded up to a multiple
        return grid_t, resized_height // self.patch_size, resized_width // self.patch_size

    def get_num_of_video_patches(
        self, num_frames: int, height: int, width: int, videos_kwargs: dict[str, Any] | None = None
    ) -> int:
        """Number of vision-tower patches (before the merge) of a ``num_frames x height x width`` video.

        Token count in the LM = this // merge_size**2 (Qwen3-VL adds timestamp and per-frame marker tokens).
        """
        options = dict(videos_kwargs or {})
        size = options.pop("size", None)
        size = self._to_size_dict(size, options.pop("min_pixels", None), options.pop("max_pixels", None))
        patch_size = options.get("patch_size") or self.patch_size
        temporal_patch_size = options.get("temporal_patch_size") or self.temporal_patch_size
        resized_height, resized_width = self.resized_size(num_frames, height, width, size=size, **options)
        grid_t = -(-num_frames // temporal_patch_size)  # frames are padded up to a multiple
        return grid_t * (resized_height // patch_size) * (resized_width // patch_size)

    def sample_frames(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} takes pre-sampled frames; sample them before calling it")

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        config["video_processor_type"] = self.stock_class_name
        return config

    # ---- pipeline --------------------------------------------------------------------------------------------
    def preprocess(self, videos: Any, **kwargs: Any) -> BatchFeature:
        allowed = set(self.valid_kwargs.__annotations__) | {"return_tensors"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected options {unknown}")
        options = {name: getattr(self, name, None) for name in self.valid_kwargs.__annotations__}
        options.update({name: value for name, value in kwargs.items() if value is not None})
        options.setdefault("return_tensors", None)

        if options.get("do_sample_frames"):
            raise ValueError(f"{type(self).__name__} takes pre-sampled frames: do_sample_frames must be False")
        if options.get("do_center_crop"):
            raise ValueError(f"{type(self).__name__} does not centre-crop (the Qwen-VL processors never do)")
        size = self._to_size_dict(options.get("size"), kwargs.get("min_pixels"), kwargs.get("max_pixels"))

        videos_list = make_batched_videos(videos)
        if any(isinstance(video, (str, list, tuple)) for video in videos_list):
            raise TypeError("Pass decoded frames (arrays/tensors of shape T x H x W x C), not paths or frame lists")
        metadata = [copy.deepcopy(item) for item in make_batched_metadata(videos_list, options.get("video_metadata"))]
        if len(metadata) != len(videos_list):
            raise ValueError(f"Got {len(videos_list)} videos but {len(metadata)} video_metadata entries")

        frames_list_TCHW = [
            self._to_frames_TCHW(
                video, options.get("input_data_format"), options.get("do_convert_rgb"), options.get("device")
            )
            for video in videos_list
        ]
        outputs = self._preprocess_frames(
            frames_list_TCHW,
            do_resize=options["do_resize"],
            size=size,
            resample=options["resample"],
            do_rescale=options["do_rescale"],
            rescale_factor=options["rescale_factor"],
            do_normalize=options["do_normalize"],
            image_mean=options["image_mean"],
            image_std=options["image_std"],
            patch_size=options["patch_size"],
            temporal_patch_size=options["temporal_patch_size"],
            merge_size=options["merge_size"],
            cap_pixels_per_frame=bool(options.get("cap_pixels_per_frame")),
            max_video_tokens=options.get("max_video_tokens"),
        )
        result = BatchFeature(data=outputs, tensor_type=options["return_tensors"])
        if options.get("return_metadata"):
            result["video_metadata"] = metadata
        return result

    def _to_size_dict(self, size: Any, min_pixels: int | None, max_pixels: int | None) -> SizeDict:
        if size is None:
            size = self.size
        size_dict = dict(size) if isinstance(size, (dict, SizeDict)) else {}
        if min_pixels is not None:
            size_dict["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size_dict["longest_edge"] = max_pixels
        size_dict = {key: value for key, value in size_dict.items() if value is not None}
        if not size_dict.get("shortest_edge") or not size_dict.get("longest_edge"):
            raise ValueError(f"size must give 'shortest_edge' and 'longest_edge' (min/max pixels), got {size}")
        return SizeDict(shortest_edge=size_dict["shortest_edge"], longest_edge=size_dict["longest_edge"])

    @staticmethod
    def _to_frames_TCHW(video: Any, input_data_format: Any, do_convert_rgb: bool | None, device: Any) -> torch.Tensor:
        frames = torch.from_numpy(np.ascontiguousarray(video)) if isinstance(video, np.ndarray) else video
        if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
            raise TypeError(f"Each video must be a 4-D array/tensor of frames, got {type(video).__name__}")
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(frames)
        if ChannelDimension(input_data_format) == ChannelDimension.LAST:
            # A channels-last VIEW, not a copy: at full resolution the copy cost more than the resize. torch's
            # uint8 anti-aliased resize works on channels-last memory anyway (it converts contiguous input to it),
            # so the result is bit-identical; only the small resized frames are made contiguous (patchify).
            frames = frames.permute(0, 3, 1, 2)
        frames_TCHW = frames
        if frames_TCHW.shape[-3] not in (1, 3):
            raise ValueError(f"Frames must have 1 (grey) or 3 (RGB) channels, got {frames_TCHW.shape[-3]}")
        if do_convert_rgb:
            frames_TCHW = grayscale_to_rgb_like_torchvision(frames_TCHW)
        if device is not None:
            frames_TCHW = frames_TCHW.to(device)
        return frames_TCHW

    def _preprocess_frames(
        self,
        frames_list_TCHW: list[torch.Tensor],
        *,
        do_resize: bool,
        size: SizeDict,
        resample: Any,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Any,
        image_std: Any,
        patch_size: int,
        temporal_patch_size: int,
        merge_size: int,
        cap_pixels_per_frame: bool,
        max_video_tokens: int | None,
    ) -> dict[str, torch.Tensor]:
        mode = interpolation_mode(resample)
        # Videos of one (T, H, W) are resized as one batch, as in the stock processors.
        grouped, grouped_index = group_videos_by_shape(frames_list_TCHW)
        resized_grouped = {}
        for shape, videos_BTCHW in grouped.items():
            if do_resize:
                num_frames, height, width = videos_BTCHW.shape[1], videos_BTCHW.shape[-2], videos_BTCHW.shape[-1]
                target_hw = self.resized_size(
                    num_frames,
                    height,
                    width,
                    size=size,
                    patch_size=patch_size,
                    merge_size=merge_size,
                    temporal_patch_size=temporal_patch_size,
                    cap_pixels_per_frame=cap_pixels_per_frame,
                    max_video_tokens=max_video_tokens,
                )
                videos_BTCHW = resize_like_torchvision(videos_BTCHW, target_hw, mode=mode, antialias=True)
            resized_grouped[shape] = videos_BTCHW
        resized = reorder_videos(resized_grouped, grouped_index)

        grouped, grouped_index = group_videos_by_shape(resized)
        patches_grouped: dict[Any, torch.Tensor] = {}
        grids_grouped: dict[Any, list[list[int]]] = {}
        for shape, videos_BTCHW in grouped.items():
            # Patchify first (a uint8 copy, 4x less memory traffic than float32), then rescale/normalise the
            # patches per channel: the same float ops on the same values as normalising the frames first.
            patches, grid_t, grid_h, grid_w = patchify_videos(
                videos_BTCHW.contiguous(), patch_size=patch_size, merge_size=merge_size,
                temporal_patch_size=temporal_patch_size,
            )
            batch, num_patches, _ = patches.shape
            channels = videos_BTCHW.shape[-3]
            patches = rescale_and_normalize_like_transformers(
                patches.view(batch, num_patches, channels, -1, 1), do_rescale, rescale_factor, do_normalize,
                image_mean, image_std,
            ).view(batch, num_patches, -1)
            patches_grouped[shape] = patches
            grids_grouped[shape] = [[grid_t, grid_h, grid_w]] * len(videos_BTCHW)

        patches_per_video = reorder_videos(patches_grouped, grouped_index)
        grids = reorder_videos(grids_grouped, grouped_index)
        return {
            "pixel_values_videos": (patches_per_video[0] if len(patches_per_video) == 1
                                    else torch.cat(patches_per_video, dim=0)),
            "video_grid_thw": torch.tensor(grids),
        }


class Qwen2VLVideoProcessorTorch(QwenVideoProcessor):
    """Torch-only ``Qwen2VLVideoProcessor`` (Qwen2-VL and Qwen2.5-VL): per-frame pixel bounds, patch 14."""

    stock_class_name = "Qwen2VLVideoProcessor"
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    patch_size = 14
    max_video_tokens = 128000

    def resized_size(
        self, num_frames: int, height: int, width: int, size: SizeDict | None = None, **overrides: Any
    ) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size, factor, temporal_factor, cap, max_video_tokens = self._resize_options(size, overrides)
        max_pixels = size.longest_edge
        if cap:
            # qwen-vl-utils: the per-frame cap is also bounded by an even share of a whole-video budget
            total_pixels = int(max_video_tokens * factor * factor * 0.9)
            max_pixels = max(
                min(max_pixels, total_pixels * temporal_factor // num_frames), int(size.shortest_edge * 1.05)
            )
        return smart_resize(height, width, factor=factor, min_pixels=size.shortest_edge, max_pixels=max_pixels)


class Qwen3VLVideoProcessorTorch(QwenVideoProcessor):
    """Torch-only ``Qwen3VLVideoProcessor``: pixel bounds over all frames together, patch 16, mean=std=0.5.

    Qwen3-VL's smart_resize refuses videos with fewer frames than ``temporal_patch_size`` (2).
    """

    stock_class_name = "Qwen3VLVideoProcessor"
    size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    patch_size = 16
    max_video_tokens = 768

    def resized_size(
        self, num_frames: int, height: int, width: int, size: SizeDict | None = None, **overrides: Any
    ) -> tuple[int, int]:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        size, factor, temporal_factor, cap, max_video_tokens = self._resize_options(size, overrides)
        max_pixels = size.longest_edge
        if cap:
            # qwen-vl-utils: per-frame pixels capped at max_video_tokens patches or an even share of the budget
            frame_cap = max_video_tokens * factor * factor
            pixels_per_frame = max(min(frame_cap, size.longest_edge // num_frames), int(size.shortest_edge * 1.05))
            max_pixels = pixels_per_frame * num_frames
        return smart_resize(
            num_frames,
            height,
            width,
            temporal_factor=temporal_factor,
            factor=factor,
            min_pixels=size.shortest_edge,
            max_pixels=max_pixels,
        )


__all__ = [
    "ClipVideoMetadata",
    "Qwen2VLVideoProcessorTorch",
    "Qwen3VLVideoProcessorTorch",
    "QwenVideoProcessor",
    "QwenVideoProcessorKwargs",
    "VideoMetadata",
]
