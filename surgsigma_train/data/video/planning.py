"""Metadata-first planning of visual tokens, frame timestamps for the model, and the per-sample token cap.

Planning
--------
``plan_video(meta, frame_indices, family, processor, min_pixels=, max_pixels=)`` says, from container metadata
alone (frame count, fps, width, height, frame times) and the chosen frames, before anything is decoded, exactly
what the processor will make of the clip: ``grid_thw``, the resized height and width, the rows of
``pixel_values_videos`` and ``num_tokens``, the number of ``input_ids`` the media span occupies: whatever the
processor makes of the chat template's ``<|vision_start|><|video_pad|><|vision_end|>`` (with Qwen3-VL's
``<t seconds>`` text and one vision start/end pair per temporal patch). ``plan_image`` does the same for an
image. Nothing is re-derived here:

* sizes come from the processors' own resize rules (``QwenVideoProcessor.planned_grid_thw``,
  ``QwenImageProcessor.resized_size``, i.e. transformers' ``smart_resize`` with the processor's settings);
* the span text is the processor's own ``replace_video_token`` / ``replace_image_token`` applied to the planned
  grid and to the ``ClipVideoMetadata`` the data layer will pass (``video_metadata_for_frames`` here,
  ``video_metadata_for_clip`` after decoding: the same times, so the same text), put in place of the wrapped
  placeholder by the processor's own ``get_text_with_replacements``. The layout around the replacement is the
  installed transformers' and never hand-kept: up to 5.24 Qwen3-VL kept the template's outer
  ``<|vision_start|>``/``<|vision_end|>`` around its per-patch pairs; 5.25 collapses it (2 tokens fewer a video);
* its length is counted by the processor's tokenizer. Media tokens are special tokens, so a span tokenises the
  same alone as inside a conversation, and ``count_text_tokens`` gives the rest of the sample::

      len(input_ids) == count_text_tokens(text) + sum(plan.num_tokens for every image and video plan)

Timestamps
----------
Frame times given to the model come from the real presentation times (``VideoMeta.time_of`` before decoding,
``VideoClip.timestamps_s`` after), carried by ``ClipVideoMetadata`` (see ``models/video_processor.py``):

* Qwen2.5-VL: ``second_per_grid_ts`` = ``temporal_patch_size`` x the mean real interval between the frames
  (e.g. 4 frames 0.5 s apart -> 1.0 s per temporal patch), wherever the clip lies in the file; the stock
  ``len(frames) / total_num_frames * fps`` would give 1800 s for a 2 s clip of a 1 h video.
* Qwen3-VL: ``<t seconds>`` per temporal patch = mean of its first and last frame time (stock rule, real times).
  ``timestamps="clip"`` (default): seconds from the clip start (``SamplingSpec.start_s``; 0 for a whole video),
  as if the clip were its own file. Why: the stock processor and qwen-vl-utils count from frame 0 of the video
  they are given, so a clip stored as its own file (the usual training case) starts at 0, and a clip cut from a
  3 h procedure should look the same (its training distribution is not published; this is the assumption).
  Caveat: qwen-vl-utils given ``video_start`` on a long file reports times from the start of the FILE;
  ``timestamps="source"`` does that, for tasks that need absolute time in the procedure.
* Qwen2-VL: no timestamps (frame times are accepted and ignored).

Token cap (``fit_to_budget``)
-----------------------------
Inputs: the sample's videos (each with its requested frames, ``n_req`` of them, and the spec's ``min_frames``),
``other_tokens`` (text and image spans; never reduced), the cap ``max_tokens``, the video pixel bounds
``[P_min, P_max]`` (``P_max`` = the run's configured video max_pixels). Rule, deterministic:

1. Allowed frame counts of a video: ``n_req`` itself and every multiple of ``temporal_patch_size`` below it that
   is >= ``min_frames`` (a count between two multiples costs as many tokens as the multiple above it, because the
   processor pads the last temporal patch, so it never helps). A lower count takes evenly spaced frames of the
   requested ones, first and last kept (``VideoRequest.select`` can replace this), so the clip stays uniformly
   covered and no frame outside the requested window (e.g. after ``observe_until_s``) is ever added.
2. All videos of a sample share one frame cap ``N`` (each video uses its largest allowed count <= ``N``, or its
   smallest) and one ``max_pixels`` ``p`` (one processor call takes one value for all its videos).
3. Frames are lowered first; pixels only once every video is at its fewest frames:

   a. ``p = P_max``; ``N`` from the largest request down: the first whose total
      ``other_tokens + sum(video spans)`` is <= ``max_tokens`` is kept.
   b. Otherwise every video at its fewest allowed frames, and ``p`` = the largest integer in ``[P_min, P_max)``
      that fits, found by bisection (planned tokens never decrease as max_pixels grows, for both Qwen resize
      rules).
   c. If that does not fit even at ``p = P_min``: drop, with the smallest achievable total in the reason. A sample
      is never truncated, least of all inside a media span.

   As the cap shrinks, ``(p, N)`` therefore never grows (compared ``p`` first), and a kept sample always fits.
   Qwen3-VL note: its ``max_pixels`` bounds all frames together, so at ``P_max`` fewer frames are each larger and
   need not cost fewer tokens; step (a) then keeps the most frames that fit at full resolution, and step (b)
   lowers the resolution of the fewest frames, i.e. resolution is kept before frame count for every family.

Inputs the processor would refuse (aspect ratio > 200, fewer than 2 frames for Qwen3-VL, a frame index outside the
file) raise ``PlanningError`` from ``plan_*`` and become a drop with that reason in ``fit_to_budget``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.image_utils import SizeDict

from surgsigma_train.data.video.types import VideoClip, VideoMeta
from surgsigma_train.models.family import ModelFamily
from surgsigma_train.models.image_processor import QwenImageProcessor
from surgsigma_train.models.registry import get_family
from surgsigma_train.models.video_processor import ClipVideoMetadata, QwenVideoProcessor

TimestampMode = Literal["clip", "source"]

# Our chat templates wrap every medium as <|vision_start|><|image_pad|><|vision_end|> (or <|video_pad|>);
# the processor replaces the pad token, the wrapper stays and belongs to the media span.
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


class PlanningError(ValueError):
    """Inputs the processor would refuse (a user/data error, not an infrastructure one)."""


# ---- timestamps --------------------------------------------------------------------------------------------------
def timestamp_origin_s(clip_start_s: float | None, timestamps: TimestampMode = "clip") -> float:
    """Time (s, in the source file) that the model's frame times count from: the clip start or the file start."""
    if timestamps == "clip":
        return float(clip_start_s or 0.0)
    if timestamps == "source":
        return 0.0
    raise ValueError(f"timestamps must be 'clip' or 'source', got {timestamps!r}")


def video_metadata_for_frames(
    meta: VideoMeta,
    frame_indices: Sequence[int],
    *,
    clip_start_s: float | None = None,
    timestamps: TimestampMode = "clip",
) -> ClipVideoMetadata:
    """Processor metadata for frames ``frame_indices`` of ``meta``'s file, times from the container (no decoding)."""
    _check_indices(meta, frame_indices)
    times_s = [meta.time_of(int(index)) for index in frame_indices]
    origin_s = timestamp_origin_s(clip_start_s, timestamps)
    return ClipVideoMetadata(
        total_num_frames=meta.num_frames,
        fps=meta.fps,
        width=meta.width,
        height=meta.height,
        duration=meta.duration_s,
        video_backend=meta.backend or None,
        frames_indices=[int(index) for index in frame_indices],
        frame_times_s=times_s,
        time_origin_s=_origin_at_or_before(origin_s, times_s),
    )


def video_metadata_for_clip(
    clip: VideoClip, *, clip_start_s: float | None = None, timestamps: TimestampMode = "clip"
) -> ClipVideoMetadata:
    """Processor metadata for decoded frames: their real presentation times (``clip.timestamps_s``)."""
    num_frames, height, width = (int(size) for size in clip.frames_THWC.shape[:3])
    if len(clip.timestamps_s) != num_frames or len(clip.frame_indices) != num_frames:
        raise ValueError(
            f"{clip.path}: {num_frames} frames but {len(clip.timestamps_s)} timestamps and "
            f"{len(clip.frame_indices)} indices"
        )
    return ClipVideoMetadata(
        total_num_frames=clip.source_num_frames,
        fps=clip.source_fps,
        width=width,
        height=height,
        duration=clip.source_num_frames / clip.source_fps if clip.source_fps else None,
        video_backend=clip.backend or None,
        frames_indices=list(clip.frame_indices),
        frame_times_s=list(clip.timestamps_s),
        time_origin_s=_origin_at_or_before(timestamp_origin_s(clip_start_s, timestamps), clip.timestamps_s),
    )


def _origin_at_or_before(origin_s: float, times_s: Sequence[float]) -> float:
    # The sampler only picks frames at or after the clip start; a decoder's pts and the container index can still
    # disagree by a rounding hair, which must not fail the sample: the clip then starts at its first frame.
    if not times_s:
        raise PlanningError("no frames")
    return min(origin_s, float(times_s[0]))


# ---- plans -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoPlan:
    """What the processor will produce for one video, known before decoding."""

    family: str
    frame_indices: tuple[int, ...]  # frames to decode, indices into the source file
    frame_times_s: tuple[float, ...]  # their presentation times in the source file
    time_origin_s: float  # the model sees frame_times_s - time_origin_s (Qwen3-VL text)
    min_pixels: int  # the video size bounds this plan was made with (pass them to the processor)
    max_pixels: int
    grid_thw: tuple[int, int, int]  # row of video_grid_thw
    resized_height: int
    resized_width: int
    num_patches: int  # rows of pixel_values_videos = t * h * w
    num_pad_tokens: int  # <|video_pad|> tokens = num_patches / merge_size**2
    num_tokens: int  # input_ids of the whole media span (wrapper, pads, Qwen3-VL timestamps and markers)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


@dataclass(frozen=True)
class ImagePlan:
    """What the processor will produce for one image, known from its size alone."""

    family: str
    height: int
    width: int
    min_pixels: int
    max_pixels: int
    grid_thw: tuple[int, int, int]  # row of image_grid_thw (t = 1)
    resized_height: int
    resized_width: int
    num_patches: int  # rows of pixel_values
    num_pad_tokens: int  # <|image_pad|> tokens
    num_tokens: int  # input_ids of the whole media span (wrapper + pads)


class _Planner:
    """Per-(family, processor) planning with a cache of span token counts (``fit_to_budget`` asks many times)."""

    def __init__(self, family: ModelFamily | str, processor: Any) -> None:
        self.family = get_family(family) if isinstance(family, str) else family
        if not isinstance(processor, self.family.processor_class):
            raise TypeError(
                f"{self.family.name}: planning needs the processor built by this family with vision_backend "
                f"'auto'/'ours' ({self.family.processor_class.__name__}), got {type(processor).__name__}"
            )
        if not isinstance(processor.image_processor, QwenImageProcessor) or not isinstance(
            processor.video_processor, QwenVideoProcessor
        ):
            raise TypeError("planning needs our torchvision-free image/video processors (vision_backend 'auto'/'ours')")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor: QwenImageProcessor = processor.image_processor
        self.video_processor: QwenVideoProcessor = processor.video_processor
        self._span_tokens: dict[Any, int] = {}

    # -- spans
    def _count_span_tokens(self, replacement: str, pad_token: str) -> int:
        """Tokens the wrapped placeholder ``<|vision_start|>`` + pad + ``<|vision_end|>`` becomes, counted by the
        tokenizer after the processor's own text expansion (which decides what happens to the wrapper).

        Runs of the (special, single-token) pad are collapsed before tokenising and added back by count: a
        12k-pad span then costs a 30-token tokenisation. Special tokens split the text, so this is exact.
        """
        replacements = {"images_replacements" if pad_token == self.processor.image_token else "videos_replacements":
                        [replacement]}
        (text,), _ = self.processor.get_text_with_replacements([VISION_START + pad_token + VISION_END], **replacements)
        pad_run = re.compile(f"(?:{re.escape(pad_token)})+")
        runs = pad_run.findall(text)
        num_pads = sum(len(run) for run in runs) // len(pad_token)
        collapsed = pad_run.sub(pad_token, text)
        return len(self.tokenizer(collapsed, add_special_tokens=False)["input_ids"]) - len(runs) + num_pads

    def video_span_tokens(self, grid_thw: tuple[int, int, int], metadata: ClipVideoMetadata) -> int:
        key = ("video", grid_thw, tuple(metadata.timestamps))
        if key not in self._span_tokens:
            inputs = {"video_grid_thw": torch.tensor([grid_thw]), "video_metadata": [metadata]}
            replacement = self.processor.replace_video_token(inputs, video_idx=0)
            self._span_tokens[key] = self._count_span_tokens(replacement, self.processor.video_token)
        return self._span_tokens[key]

    def image_span_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        key = ("image", grid_thw)
        if key not in self._span_tokens:
            replacement = self.processor.replace_image_token({"image_grid_thw": torch.tensor([grid_thw])}, image_idx=0)
            self._span_tokens[key] = self._count_span_tokens(replacement, self.processor.image_token)
        return self._span_tokens[key]

    # -- plans
    def video_bounds(self, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        size = self.video_processor.size
        return _bounds(min_pixels, max_pixels, size)

    def video(
        self,
        meta: VideoMeta,
        frame_indices: Sequence[int],
        *,
        min_pixels: int | None,
        max_pixels: int | None,
        clip_start_s: float | None,
        timestamps: TimestampMode,
        frame_size_HW: tuple[int, int] | None = None,
    ) -> VideoPlan:
        min_pixels, max_pixels = self.video_bounds(min_pixels, max_pixels)
        if not frame_indices:
            raise PlanningError(f"{meta.path}: no frames to plan")
        height, width = frame_size_HW if frame_size_HW is not None else (meta.height, meta.width)
        try:
            metadata = video_metadata_for_frames(meta, frame_indices, clip_start_s=clip_start_s, timestamps=timestamps)
            grid_thw = self.video_processor.planned_grid_thw(
                len(frame_indices), height, width, min_pixels=min_pixels, max_pixels=max_pixels
            )
        except PlanningError:
            raise
        except ValueError as error:  # smart_resize / metadata refusals: the processor would refuse the same input
            raise PlanningError(f"{meta.path}: {error}") from error
        patch_size, merge_size = self.video_processor.patch_size, self.video_processor.merge_size
        num_patches = grid_thw[0] * grid_thw[1] * grid_thw[2]
        return VideoPlan(
            family=self.family.name,
            frame_indices=tuple(int(index) for index in frame_indices),
            frame_times_s=tuple(metadata.frame_times_s),  # type: ignore[arg-type]
            time_origin_s=metadata.time_origin_s,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            grid_thw=grid_thw,
            resized_height=grid_thw[1] * patch_size,
            resized_width=grid_thw[2] * patch_size,
            num_patches=num_patches,
            num_pad_tokens=num_patches // merge_size**2,
            num_tokens=self.video_span_tokens(grid_thw, metadata),
        )

    def image(self, height: int, width: int, *, min_pixels: int | None, max_pixels: int | None) -> ImagePlan:
        min_pixels, max_pixels = _bounds(min_pixels, max_pixels, self.image_processor.size)
        size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
        try:
            resized_height, resized_width = self.image_processor.resized_size(height, width, size=size)
        except ValueError as error:
            raise PlanningError(f"image {height}x{width}: {error}") from error
        patch_size, merge_size = self.image_processor.patch_size, self.image_processor.merge_size
        grid_thw = (1, resized_height // patch_size, resized_width // patch_size)
        num_patches = grid_thw[1] * grid_thw[2]
        return ImagePlan(
            family=self.family.name,
            height=height,
            width=width,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            grid_thw=grid_thw,
            resized_height=resized_height,
            resized_width=resized_width,
            num_patches=num_patches,
            num_pad_tokens=num_patches // merge_size**2,
            num_tokens=self.image_span_tokens(grid_thw),
        )


def _bounds(min_pixels: int | None, max_pixels: int | None, size: Any) -> tuple[int, int]:
    min_pixels = int(size.shortest_edge if min_pixels is None else min_pixels)
    max_pixels = int(size.longest_edge if max_pixels is None else max_pixels)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    return min_pixels, max_pixels


def _check_indices(meta: VideoMeta, frame_indices: Sequence[int]) -> None:
    bad = [int(index) for index in frame_indices if not 0 <= int(index) < meta.num_frames]
    if bad:
        raise PlanningError(f"{meta.path}: frame indices {bad[:5]} outside the file's {meta.num_frames} frames")


def uniform_whole_video_indices(num_source_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread over the whole file, first and last included (qwen-vl-utils' rule)."""
    return _evenly_spaced_positions(num_source_frames, num_frames)


def plan_video(
    meta: VideoMeta,
    frame_indices: Sequence[int] | int,
    family: ModelFamily | str,
    processor: Any,
    *,
    min_pixels: int | None,
    max_pixels: int | None,
    clip_start_s: float | None = None,
    timestamps: TimestampMode = "clip",
    frame_size_HW: tuple[int, int] | None = None,
) -> VideoPlan:
    """The exact visual token plan of frames ``frame_indices`` of ``meta``'s file, before decoding.

    ``frame_indices``: the frames the sampler chose (exact for every family), or a frame count: then frames
    spread over the whole file are assumed (``uniform_whole_video_indices``), which is exact for Qwen2-VL and
    Qwen2.5-VL (counts only depend on the number of frames) and, for Qwen3-VL, exact for such frames only
    (the digits of its timestamp text depend on the times).
    ``min_pixels`` / ``max_pixels``: the video size bounds (None: the processor's configured ones); per frame for
    Qwen2/2.5-VL, over all frames for Qwen3-VL.
    ``clip_start_s`` / ``timestamps``: where the model's frame times count from (see the module docstring).
    ``frame_size_HW``: size of the frames the processor will get when the decoder resizes them (a ``Resize`` in
    ``load_clip``); default the container's ``(meta.height, meta.width)``.
    """
    if isinstance(frame_indices, int):
        frame_indices = uniform_whole_video_indices(meta.num_frames, frame_indices)
    return _Planner(family, processor).video(
        meta,
        frame_indices,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        clip_start_s=clip_start_s,
        timestamps=timestamps,
        frame_size_HW=frame_size_HW,
    )


def plan_image(
    height: int,
    width: int,
    family: ModelFamily | str,
    processor: Any,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ImagePlan:
    """The exact visual token plan of a ``height x width`` image (None bounds: the processor's configured ones)."""
    return _Planner(family, processor).image(height, width, min_pixels=min_pixels, max_pixels=max_pixels)


def count_text_tokens(text: str, processor: Any) -> int:
    """Tokens of a rendered conversation outside its media spans.

    ``text`` as our chat templates render it, with one ``<|vision_start|><|image_pad|><|vision_end|>`` (or
    ``<|video_pad|>``) per medium; the sample then has ``count_text_tokens(text) + sum(plan.num_tokens)`` tokens.

    Counted on the processor's own expansion of ``text`` with the smallest media, minus those media's own span
    tokens: a span that starts with plain text (Qwen3-VL videos on transformers >= 5.25 start with
    ``<t seconds>``, the outer ``<|vision_start|>`` collapsed) can merge with the text before it (``" at "`` +
    ``"<0.5"`` tokenises as ``" at"``, ``" <"``...), so the text alone would be one token off. Only the span's
    first characters take part in that merge, and they do not depend on the media's size or times.
    """
    tokenizer = processor.tokenizer
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start_id, end_id = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END])
    pad_ids = set(tokenizer.convert_tokens_to_ids([processor.image_token, processor.video_token]))
    for position, token_id in enumerate(input_ids):
        if token_id not in pad_ids:
            continue
        wrapped = 0 < position < len(input_ids) - 1 and (
            input_ids[position - 1] == start_id and input_ids[position + 1] == end_id
        )
        if not wrapped:
            raise PlanningError(
                f"a media placeholder at token {position} is not wrapped in {VISION_START}..{VISION_END}"
            )
    num_images, num_videos = text.count(processor.image_token), text.count(processor.video_token)
    if not num_images and not num_videos:
        return len(input_ids)
    (image, image_span), (video, video_span) = _smallest_media(processor)
    expanded = processor.get_text_with_replacements(
        [text], images_replacements=[image] * num_images, videos_replacements=[video] * num_videos
    )[0][0]
    expanded_tokens = len(tokenizer(expanded, add_special_tokens=False)["input_ids"])
    return expanded_tokens - num_images * image_span - num_videos * video_span


def _smallest_media(processor: Any) -> tuple[tuple[str, int], tuple[str, int]]:
    """(replacement text, span tokens) of a one-patch image and of a one-temporal-patch video, per processor: the
    processor's own replacement and what its text expansion makes of the wrapped placeholder (cached)."""
    cached = _SMALLEST_REPLACEMENTS.get(processor)
    if cached is None:
        merge = processor.video_processor.merge_size
        grid = torch.tensor([[1, merge, merge]])
        frames = processor.video_processor.temporal_patch_size
        metadata = ClipVideoMetadata(
            total_num_frames=frames, fps=1.0, width=merge, height=merge, duration=float(frames),
            frames_indices=list(range(frames)), frame_times_s=[float(index) for index in range(frames)],
        )
        replacements = {
            "image": processor.replace_image_token({"image_grid_thw": grid}, image_idx=0),
            "video": processor.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, video_idx=0),
        }
        spans = {}
        for kind, replacement in replacements.items():
            wrapped = VISION_START + getattr(processor, f"{kind}_token") + VISION_END
            alone = processor.get_text_with_replacements([wrapped], **{f"{kind}s_replacements": [replacement]})[0][0]
            spans[kind] = len(processor.tokenizer(alone, add_special_tokens=False)["input_ids"])
        cached = ((replacements["image"], spans["image"]), (replacements["video"], spans["video"]))
        _SMALLEST_REPLACEMENTS[processor] = cached
    return cached


# not an attribute of the processor: save_pretrained would write it into processor_config.json
_SMALLEST_REPLACEMENTS: weakref.WeakKeyDictionary[Any, tuple[tuple[str, int], tuple[str, int]]] = (
    weakref.WeakKeyDictionary())


# ---- token cap ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoRequest:
    """One video of a sample as the sampler chose it, before the token cap is applied."""

    meta: VideoMeta
    frame_indices: tuple[int, ...]  # the frames the sampler chose for the spec: the most that will be used
    min_frames: int = 1  # SamplingSpec.min_frames: the cap never goes below it (unless fewer were requested)
    clip_start_s: float | None = None  # SamplingSpec.start_s (origin of clip-relative timestamps)
    timestamps: TimestampMode = "clip"
    frame_size_HW: tuple[int, int] | None = None  # frames' size after a decode-time Resize (default: container's)
    # Frames for a lower count n (must return n indices). Default: evenly spaced requested frames (first and
    # last kept). E.g. ``lambda n: select_frames(meta, replace(spec, num_frames=n), sample_key=..., epoch=...)``.
    select: Callable[[int], Sequence[int]] | None = field(default=None, compare=False)

    @classmethod
    def from_spec(
        cls,
        meta: VideoMeta,
        spec: Any,
        frame_indices: Sequence[int],
        *,
        timestamps: TimestampMode = "clip",
        frame_size_HW: tuple[int, int] | None = None,
        select: Callable[[int], Sequence[int]] | None = None,
    ) -> VideoRequest:
        """A request from a ``SamplingSpec`` and the frames ``select_frames`` chose for it."""
        return cls(
            meta=meta,
            frame_indices=tuple(int(index) for index in frame_indices),
            min_frames=spec.min_frames,
            clip_start_s=spec.start_s,
            timestamps=timestamps,
            frame_size_HW=frame_size_HW,
            select=select,
        )

    def frames_for(self, num_frames: int) -> tuple[int, ...]:
        if num_frames == len(self.frame_indices):
            return self.frame_indices
        if self.select is None:
            return tuple(_evenly_spaced(self.frame_indices, num_frames))
        chosen = tuple(int(index) for index in self.select(num_frames))
        if len(chosen) != num_frames:
            raise PlanningError(f"{self.meta.path}: select({num_frames}) returned {len(chosen)} frames")
        return chosen


@dataclass(frozen=True)
class BudgetDecision:
    """What to do with one sample under the token cap."""

    keep: bool
    reason: str  # why (always set: what was lowered, or why the sample is dropped)
    total_tokens: int  # planned len(input_ids) with `plans`; when dropped, the least achievable (-1: unplannable)
    max_tokens: int
    other_tokens: int  # text + image spans (never reduced)
    min_pixels: int  # video size bounds to process this sample with (same for all its videos)
    max_pixels: int
    plans: tuple[VideoPlan, ...]  # one per video, in order; empty when dropped
    frames_lowered: bool
    pixels_lowered: bool


def _evenly_spaced_positions(count: int, num_frames: int) -> list[int]:
    """``num_frames`` distinct positions in ``range(count)``, evenly spaced, first and last kept (middle for 1)."""
    if not 0 < num_frames <= count:
        raise PlanningError(f"cannot take {num_frames} of {count} frames")
    if num_frames == 1:
        return [(count - 1) // 2]
    # round(k * (count - 1) / (num_frames - 1)) in integer arithmetic (half up); steps >= 1 keep them distinct
    return [(2 * k * (count - 1) + num_frames - 1) // (2 * (num_frames - 1)) for k in range(num_frames)]


def _evenly_spaced(indices: Sequence[int], num_frames: int) -> list[int]:
    return [indices[position] for position in _evenly_spaced_positions(len(indices), num_frames)]


def _allowed_counts(requested: int, min_frames: int, temporal_patch_size: int) -> list[int]:
    """Frame counts a video may use, descending: the request, then lower multiples of the temporal patch."""
    floor = max(1, min(min_frames, requested))
    lower = [
        multiple
        for multiple in range(((requested - 1) // temporal_patch_size) * temporal_patch_size, 0, -temporal_patch_size)
        if multiple >= floor
    ]
    return [requested] + lower


def fit_to_budget(
    videos: Sequence[VideoRequest],
    family: ModelFamily | str,
    processor: Any,
    *,
    max_tokens: int,
    other_tokens: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> BudgetDecision:
    """Fit one sample under ``max_tokens`` by lowering video frames, then pixels; else drop (rule: module docstring).

    ``other_tokens``: everything of the sample outside its video spans (``count_text_tokens`` of the rendered text +
    its image plans' ``num_tokens``). ``min_pixels`` / ``max_pixels``: the run's video bounds (None: the
    processor's configured ones); ``max_pixels`` is the most the sample may use.
    """
    planner = _Planner(family, processor)
    min_pixels, max_pixels = planner.video_bounds(min_pixels, max_pixels)
    temporal_patch_size = planner.video_processor.temporal_patch_size

    def decision(keep: bool, reason: str, total: int, pixels: int, plans: tuple[VideoPlan, ...] = ()) -> BudgetDecision:
        return BudgetDecision(
            keep=keep,
            reason=reason,
            total_tokens=total,
            max_tokens=max_tokens,
            other_tokens=other_tokens,
            min_pixels=min_pixels,
            max_pixels=pixels,
            plans=plans,
            frames_lowered=bool(plans) and any(p.num_frames < len(v.frame_indices) for p, v in zip(plans, videos)),
            pixels_lowered=pixels < max_pixels,
        )

    if not videos:
        if other_tokens <= max_tokens:
            return decision(True, f"fits: {other_tokens} <= {max_tokens} tokens (no video)", other_tokens, max_pixels)
        return decision(False, f"{other_tokens} tokens without any video > cap {max_tokens}", other_tokens, max_pixels)

    allowed = [_allowed_counts(len(v.frame_indices), v.min_frames, temporal_patch_size) for v in videos]
    caps = sorted({count for counts in allowed for count in counts}, reverse=True)
    counts_per_cap: list[tuple[int, ...]] = []  # distinct per-video counts, from the frame cap N high to low
    for cap in caps:
        counts = tuple(next((c for c in options if c <= cap), options[-1]) for options in allowed)
        if not counts_per_cap or counts_per_cap[-1] != counts:
            counts_per_cap.append(counts)

    plan_cache: dict[tuple[int, int, int], VideoPlan | PlanningError] = {}

    def plan(video_idx: int, num_frames: int, pixels: int) -> VideoPlan | PlanningError:
        key = (video_idx, num_frames, pixels)
        if key not in plan_cache:
            request = videos[video_idx]
            try:
                plan_cache[key] = planner.video(
                    request.meta,
                    request.frames_for(num_frames),
                    min_pixels=min_pixels,
                    max_pixels=pixels,
                    clip_start_s=request.clip_start_s,
                    timestamps=request.timestamps,
                    frame_size_HW=request.frame_size_HW,
                )
            except PlanningError as error:
                plan_cache[key] = error
        return plan_cache[key]

    def plans_for(counts: tuple[int, ...], pixels: int) -> tuple[VideoPlan, ...] | PlanningError:
        plans = [plan(i, count, pixels) for i, count in enumerate(counts)]
        errors = [p for p in plans if isinstance(p, PlanningError)]
        return errors[0] if errors else tuple(plans)  # type: ignore[return-value]

    def total(plans: tuple[VideoPlan, ...]) -> int:
        return other_tokens + sum(p.num_tokens for p in plans)

    def most_frames_that_fit(pixels: int) -> tuple[VideoPlan, ...] | None:
        for counts in counts_per_cap:
            plans = plans_for(counts, pixels)
            if not isinstance(plans, PlanningError) and total(plans) <= max_tokens:
                return plans
        return None

    def describe(plans: tuple[VideoPlan, ...]) -> str:
        frames = ", ".join(f"{len(v.frame_indices)}->{p.num_frames}" for p, v in zip(plans, videos))
        return f"frames {frames}"

    # (a) configured pixels, as many frames as fit
    fitted = most_frames_that_fit(max_pixels)
    if fitted is not None:
        tokens = total(fitted)
        lowered = any(p.num_frames < len(v.frame_indices) for p, v in zip(fitted, videos))
        reason = (
            f"fits after lowering {describe(fitted)} at max_pixels {max_pixels}: {tokens} <= {max_tokens} tokens"
            if lowered
            else f"fits as requested: {tokens} <= {max_tokens} tokens"
        )
        return decision(True, reason, tokens, max_pixels, fitted)

    # (b)/(c) every video at its fewest frames; lower the pixels, or drop when even min_pixels is too many
    floor_counts = counts_per_cap[-1]

    def fits_at_floor(pixels: int) -> tuple[VideoPlan, ...] | None:
        plans = plans_for(floor_counts, pixels)
        return None if isinstance(plans, PlanningError) or total(plans) > max_tokens else plans

    if fits_at_floor(min_pixels) is None:
        floor = plans_for(floor_counts, min_pixels)
        if isinstance(floor, PlanningError):
            return decision(False, f"cannot be planned: {floor}", -1, min_pixels)
        floor_tokens = total(floor)
        return decision(
            False,
            f"over the token cap even at the floor: {floor_tokens} tokens ({describe(floor)}, max_pixels=min_pixels="
            f"{min_pixels}; {other_tokens} outside the videos) > {max_tokens}; dropped, never truncated",
            floor_tokens,
            min_pixels,
        )

    # bisection over max_pixels: the floor fits at `low`, not at `high`
    low, high = min_pixels, max_pixels
    while high - low > 1:
        middle = (low + high) // 2
        if fits_at_floor(middle) is not None:
            low = middle
        else:
            high = middle
    fitted = fits_at_floor(low)
    assert fitted is not None  # `low` only ever moves to budgets that fit
    tokens = total(fitted)
    reason = (
        f"fits after lowering {describe(fitted)} and max_pixels {max_pixels}->{low}: {tokens} <= {max_tokens} tokens"
    )
    return decision(True, reason, tokens, low, fitted)


__all__ = [
    "BudgetDecision",
    "ImagePlan",
    "PlanningError",
    "TimestampMode",
    "VideoPlan",
    "VideoRequest",
    "count_text_tokens",
    "fit_to_budget",
    "plan_image",
    "plan_video",
    "timestamp_origin_s",
    "uniform_whole_video_indices",
    "video_metadata_for_clip",
    "video_metadata_for_frames",
]
