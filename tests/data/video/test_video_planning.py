"""Metadata-first token planning equals what the processor produces; the per-sample token cap rule."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from surgsigma_train.data.video.planning import (
    PlanningError,
    VideoRequest,
    count_text_tokens,
    fit_to_budget,
    plan_image,
    plan_video,
    uniform_whole_video_indices,
    video_metadata_for_clip,
    video_metadata_for_frames,
)
from surgsigma_train.data.video.types import SamplingSpec, VideoClip, VideoMeta
from surgsigma_train.models import get_family, known_families

VISION_START, VISION_END = 151652, 151653
IMAGE_PAD, VIDEO_PAD = 151655, 151656
MEDIA = "<|vision_start|>{}<|vision_end|>"
IMAGE, VIDEO = MEDIA.format("<|image_pad|>"), MEDIA.format("<|video_pad|>")
NUM_RANDOM_CASES = 200  # compared cases per family and modality (refused inputs come on top)

_PROCESSORS: dict[str, object] = {}


def processor_for(family: str):
    """Tiny-model processor (cached: the tokenizer load costs ~0.5 s). Bounds here are defaults only: every test
    passes its own."""
    if family not in _PROCESSORS:
        factor = get_family(family).vision_defaults.patch_size * 2
        _PROCESSORS[family] = get_family(family).build_processor(
            "tiny",
            image_min_pixels=4 * factor**2,
            image_max_pixels=64 * factor**2,
            video_min_pixels=4 * factor**2,
            video_max_pixels=32 * factor**2,
        )
    return _PROCESSORS[family]


def factor_of(family: str) -> int:
    return get_family(family).vision_defaults.patch_size * 2


def size_kwargs(min_pixels: int, max_pixels: int) -> dict:
    # channels_last pinned: a 1-3 pixel tall array would otherwise be read as channels-first
    return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "input_data_format": "channels_last"}


def media_span_tokens(processor, placeholder: str, **media) -> int:
    """Tokens one wrapped placeholder becomes in the processor's own output, whatever layout the installed
    transformers gives it (5.25 collapses Qwen3-VL's outer vision start/end pair; 5.24 kept it): the processed
    turn minus the same turn without the placeholder. Special tokens split the text, so the rest tokenises alike.
    """
    turn = "<|im_start|>user\n{}<|im_end|>"
    with_media = processor(text=[turn.format(placeholder)], return_tensors="pt", **media)["input_ids"].shape[1]
    without = len(processor.tokenizer(turn.format(""), add_special_tokens=False)["input_ids"])
    return with_media - without


# ---- random cases ------------------------------------------------------------------------------------------------
def random_height_width(rng: np.random.Generator, refusable: bool) -> tuple[int, int]:
    """Ordinary, tiny, extreme (aspect up to 199.x) and, when `refusable`, over-the-limit (>200) shapes."""
    kind = rng.choice(["ordinary", "tiny", "extreme", "over"], p=[0.55, 0.1, 0.3, 0.05] if refusable else None)
    if not refusable and kind == "over":
        kind = "extreme"
    if kind == "ordinary":
        height, width = int(rng.integers(20, 200)), int(rng.integers(20, 200))
    elif kind == "tiny":
        height, width = int(rng.integers(1, 30)), int(rng.integers(1, 30))
    else:
        short = int(rng.integers(1, 5))
        ratio = rng.uniform(100, 199.9) if kind == "extreme" else rng.uniform(201, 260)
        height, width = short, max(short, int(short * ratio))
    return (height, width) if rng.random() < 0.5 else (width, height)


def random_video_meta(rng: np.random.Generator, height: int, width: int, min_source_frames: int) -> VideoMeta:
    fps = float(rng.choice([0.5, 2.0, 23.976, 25.0, 29.97, 30.0, 60.0]))
    if rng.random() < 0.3:  # variable frame rate: irregular presentation times, known per frame
        num_frames = int(rng.integers(max(min_source_frames, 2), 3000))
        start_s = float(rng.uniform(0, 5000))
        times = start_s + np.concatenate([[0.0], np.cumsum(rng.uniform(0.2, 1.8, num_frames - 1) / fps)])
        return VideoMeta(
            path="vfr.mp4",
            num_frames=num_frames,
            fps=fps,
            duration_s=float(times[-1] + 1 / fps),
            width=width,
            height=height,
            variable_frame_rate=True,
            frame_times_s=tuple(float(t) for t in times),
        )
    num_frames = int(rng.integers(max(min_source_frames, 1), 400_000))  # up to hours: many-digit timestamps
    return VideoMeta(
        path="cfr.mp4", num_frames=num_frames, fps=fps, duration_s=num_frames / fps, width=width, height=height
    )


def random_frame_indices(rng: np.random.Generator, meta: VideoMeta, num_frames: int) -> list[int]:
    """Distinct sorted frames, usually inside a short window (a clip of a long video)."""
    window = int(min(meta.num_frames, max(num_frames, rng.integers(num_frames, 4 * num_frames + 50))))
    first = int(rng.integers(0, meta.num_frames - window + 1))
    return sorted(int(i) + first for i in rng.choice(window, num_frames, replace=False))


def clip_of(meta: VideoMeta, frame_indices: list[int], frames_THWC: np.ndarray) -> VideoClip:
    """What a decoder returns for these frames (presentation times from the container)."""
    return VideoClip(
        frames_THWC=frames_THWC,
        frame_indices=tuple(frame_indices),
        timestamps_s=tuple(meta.time_of(i) for i in frame_indices),
        source_fps=meta.fps,
        source_num_frames=meta.num_frames,
        backend="synthetic",
        path=meta.path,
    )


@pytest.mark.parametrize("family", known_families())
def test_planned_tokens_equal_processor_tokens(family):
    """>= 200 random videos and images per family: plan (metadata only) == processor output, 0 mismatches."""
    processor = processor_for(family)
    rng = np.random.default_rng({"qwen2_vl": 1, "qwen2_5_vl": 2, "qwen3_vl": 3}[family])
    factor, video_processor = factor_of(family), processor.video_processor
    min_video_frames = 2 if family == "qwen3_vl" else 1  # Qwen3-VL refuses single frames (tested below)
    compared = {"video": 0, "image": 0}
    refused = {"video": 0, "image": 0}
    mismatches: list[str] = []
    while min(compared.values()) < NUM_RANDOM_CASES:
        # -- draw a video and an image
        num_frames = int(rng.integers(min_video_frames, 10))
        video_hw = random_height_width(rng, refusable=True)
        meta = random_video_meta(rng, *video_hw, min_source_frames=num_frames)
        frame_indices = random_frame_indices(rng, meta, num_frames)
        timestamps = "clip" if rng.random() < 0.7 else "source"
        first_time_s = meta.time_of(frame_indices[0])
        clip_start_s = None if rng.random() < 0.2 else first_time_s - float(rng.uniform(0, 3))
        clip_start_s = None if clip_start_s is not None and clip_start_s < 0 else clip_start_s
        # Qwen2/2.5-VL bound each frame, Qwen3-VL all frames together
        per = num_frames if family == "qwen3_vl" else 1
        video_min = int(rng.integers(1, 8)) * factor**2 * per
        video_max = video_min + int(rng.integers(0, 40)) * factor**2 * per
        image_hw = random_height_width(rng, refusable=True)
        image_min = int(rng.integers(1, 16)) * factor**2
        image_max = image_min + int(rng.integers(0, 64)) * factor**2

        # -- plans from metadata alone
        plans = {}
        try:
            plans["video"] = plan_video(
                meta, frame_indices, family, processor, min_pixels=video_min, max_pixels=video_max,
                clip_start_s=clip_start_s, timestamps=timestamps,
            )
        except PlanningError:
            plans["video"] = None
        try:
            plans["image"] = plan_image(*image_hw, family, processor, min_pixels=image_min, max_pixels=image_max)
        except PlanningError:
            plans["image"] = None

        frames_THWC = rng.integers(0, 256, (num_frames, *video_hw, 3), dtype=np.uint8)
        image_HWC = rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8)
        metadata = video_metadata_for_clip(
            clip_of(meta, frame_indices, frames_THWC), clip_start_s=clip_start_s, timestamps=timestamps
        )
        media_kwargs = {
            "images_kwargs": size_kwargs(image_min, image_max),
            "videos_kwargs": size_kwargs(video_min, video_max),
        }
        # -- a refusal planned is a refusal by the processor (and the other way round)
        for modality, call_kwargs in (
            ("video", {"text": [VIDEO], "videos": [frames_THWC], "video_metadata": [metadata]}),
            ("image", {"text": [IMAGE], "images": [image_HWC]}),
        ):
            if plans[modality] is None:
                with pytest.raises(ValueError):
                    processor(**call_kwargs, **media_kwargs)
                refused[modality] += 1
        if plans["video"] is None or plans["image"] is None:
            continue

        # -- one conversation with both: spans, grids, pixel rows, total length
        # the text right before a medium varies: a span that starts with plain text can merge with it
        before_video = ["", " ", "\n", " then at ", "x", "  \n "][int(rng.integers(0, 6))]
        text = f"<|im_start|>user\nLook {IMAGE}{before_video}{VIDEO} please.<|im_end|>\n"
        outputs = processor(
            text=[text], images=[image_HWC], videos=[frames_THWC], video_metadata=[metadata], return_tensors="pt",
            **media_kwargs,
        )
        input_ids = outputs["input_ids"][0].tolist()
        video_plan, image_plan = plans["video"], plans["image"]
        actual = {
            "video_tokens": media_span_tokens(
                processor, VIDEO, videos=[frames_THWC], video_metadata=[metadata], videos_kwargs=media_kwargs["videos_kwargs"]
            ),
            "video_grid": tuple(outputs["video_grid_thw"][0].tolist()),
            "video_rows": outputs["pixel_values_videos"].shape[0],
            "video_pads": input_ids.count(VIDEO_PAD),
            "image_tokens": media_span_tokens(
                processor, IMAGE, images=[image_HWC], images_kwargs=media_kwargs["images_kwargs"]
            ),
            "image_grid": tuple(outputs["image_grid_thw"][0].tolist()),
            "image_rows": outputs["pixel_values"].shape[0],
            "image_pads": input_ids.count(IMAGE_PAD),
            "total": len(input_ids),
        }
        planned = {
            "video_tokens": video_plan.num_tokens,
            "video_grid": video_plan.grid_thw,
            "video_rows": video_plan.num_patches,
            "video_pads": video_plan.num_pad_tokens,
            "image_tokens": image_plan.num_tokens,
            "image_grid": image_plan.grid_thw,
            "image_rows": image_plan.num_patches,
            "image_pads": image_plan.num_pad_tokens,
            "total": count_text_tokens(text, processor) + video_plan.num_tokens + image_plan.num_tokens,
        }
        if family == "qwen2_5_vl":
            times = metadata.frame_times_s
            interval = (times[-1] - times[0]) / (len(times) - 1) if times[-1] > times[0] else 1 / meta.fps
            # real seconds per temporal patch (the tensor is float32: compare at its precision)
            expected = video_processor.temporal_patch_size * interval
            planned["seconds_per_grid"] = True
            actual["seconds_per_grid"] = math.isclose(float(outputs["second_per_grid_ts"][0]), expected, rel_tol=1e-6)
        if planned != actual:
            mismatches.append(f"{meta} {frame_indices} {video_hw} {image_hw}: planned {planned} != {actual}")
        compared["video"] += 1
        compared["image"] += 1
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"
    assert refused["video"] > 0 and refused["image"] > 0  # the >200 aspect ratios were exercised


@pytest.mark.parametrize("family", known_families())
def test_single_frame_video(family):
    """One frame: padded to a temporal patch by Qwen2/2.5-VL; refused by Qwen3-VL, by planner and processor alike."""
    processor = processor_for(family)
    meta = VideoMeta(path="one.mp4", num_frames=50, fps=25.0, duration_s=2.0, width=64, height=48)
    frames_THWC = np.zeros((1, 48, 64, 3), dtype=np.uint8)
    metadata = video_metadata_for_frames(meta, [7])
    if family == "qwen3_vl":
        with pytest.raises(PlanningError, match="temporal_factor"):
            plan_video(meta, [7], family, processor, min_pixels=None, max_pixels=None)
        with pytest.raises(ValueError):
            processor(text=[VIDEO], videos=[frames_THWC], video_metadata=[metadata])
        return
    plan = plan_video(meta, [7], family, processor, min_pixels=None, max_pixels=None)
    outputs = processor(text=[VIDEO], videos=[frames_THWC], video_metadata=[metadata], return_tensors="pt")
    assert plan.grid_thw[0] == 1 and plan.num_tokens == outputs["input_ids"].shape[1]


def test_frame_count_plans_spread_frames_over_the_whole_file():
    processor = processor_for("qwen3_vl")
    meta = VideoMeta(path="v.mp4", num_frames=3001, fps=25.0, duration_s=120.04, width=320, height=240)
    assert uniform_whole_video_indices(3001, 5) == [0, 750, 1500, 2250, 3000]
    by_count = plan_video(meta, 5, "qwen3_vl", processor, min_pixels=None, max_pixels=None)
    by_indices = plan_video(meta, [0, 750, 1500, 2250, 3000], "qwen3_vl", processor, min_pixels=None, max_pixels=None)
    assert by_count == by_indices


def test_plan_refuses_frames_outside_the_file_and_foreign_processors():
    meta = VideoMeta(path="v.mp4", num_frames=10, fps=5.0, duration_s=2.0, width=64, height=64)
    with pytest.raises(PlanningError, match="outside"):
        plan_video(meta, [3, 10], "qwen2_vl", processor_for("qwen2_vl"), min_pixels=None, max_pixels=None)
    with pytest.raises(TypeError, match="qwen3_vl"):
        plan_video(meta, [1, 2], "qwen3_vl", processor_for("qwen2_vl"), min_pixels=None, max_pixels=None)


def test_count_text_tokens_needs_wrapped_placeholders():
    processor = processor_for("qwen2_vl")
    assert count_text_tokens("hello", processor) == len(processor.tokenizer("hello")["input_ids"])
    with pytest.raises(PlanningError, match="wrapped"):
        count_text_tokens("a <|video_pad|> b", processor)


# ---- token cap ---------------------------------------------------------------------------------------------------
LONG_VIDEO = VideoMeta(path="procedure.mp4", num_frames=324_000, fps=30.0, duration_s=10_800.0, width=640, height=360)
SPEC = SamplingSpec(fps=2.0, min_frames=4, max_frames=16, start_s=3600.0, end_s=3608.0)
REQUESTED = tuple(108_000 + 15 * k for k in range(16))  # 16 frames, 0.5 s apart, 1 h into the video
ALLOWED = (16, 14, 12, 10, 8, 6, 4)  # frame counts the cap may use for this request (temporal patch 2, min 4)


def video_bounds(family: str) -> tuple[int, int]:
    factor = factor_of(family)
    if family == "qwen3_vl":
        return 16 * factor**2, 16 * 48 * factor**2  # over all frames
    return 4 * factor**2, 48 * factor**2  # per frame


def request(**overrides) -> VideoRequest:
    return dataclasses.replace(VideoRequest.from_spec(LONG_VIDEO, SPEC, REQUESTED), **overrides)


def fit(family: str, max_tokens: int, videos=None, other_tokens: int = 100):
    min_pixels, max_pixels = video_bounds(family)
    return fit_to_budget(
        [request()] if videos is None else videos, family, processor_for(family), max_tokens=max_tokens,
        other_tokens=other_tokens, min_pixels=min_pixels, max_pixels=max_pixels,
    )


def plan_total(family: str, frames: tuple[int, ...], max_pixels: int, other_tokens: int = 100) -> int:
    min_pixels, _ = video_bounds(family)
    plan = plan_video(
        LONG_VIDEO, frames, family, processor_for(family), min_pixels=min_pixels, max_pixels=max_pixels,
        clip_start_s=SPEC.start_s,
    )
    return other_tokens + plan.num_tokens


def frame_key(decision) -> tuple[int, int]:
    return (decision.max_pixels, decision.plans[0].num_frames)


@pytest.mark.parametrize("family", known_families())
def test_fit_lowers_frames_first_then_pixels_then_drops(family):
    min_pixels, max_pixels = video_bounds(family)
    full = plan_total(family, REQUESTED, max_pixels)
    # the fewest tokens any allowed frame count takes at the configured pixels (Qwen3-VL's pixel bound covers all
    # frames together, so fewer frames are larger and need not be fewer tokens)
    at_floor = min(plan_total(family, request().frames_for(n), max_pixels) for n in ALLOWED)
    least = plan_total(family, request().frames_for(4), min_pixels)
    assert least < at_floor < full

    kept = fit(family, full)
    assert kept.keep and not kept.frames_lowered and not kept.pixels_lowered and kept.total_tokens == full
    assert kept.plans[0].frame_indices == REQUESTED and "as requested" in kept.reason

    fewer = fit(family, full - 1)
    assert fewer.keep and fewer.frames_lowered and not fewer.pixels_lowered and fewer.max_pixels == max_pixels
    assert fewer.plans[0].num_frames % 2 == 0 and 4 <= fewer.plans[0].num_frames < 16
    assert fewer.total_tokens <= full - 1 and "frames 16->" in fewer.reason

    smaller = fit(family, at_floor - 1)
    assert smaller.keep and smaller.pixels_lowered and min_pixels <= smaller.max_pixels < max_pixels
    assert smaller.plans[0].num_frames == SPEC.min_frames
    assert smaller.total_tokens <= at_floor - 1 and "max_pixels" in smaller.reason

    dropped = fit(family, least - 1)
    assert not dropped.keep and dropped.plans == () and dropped.total_tokens == least
    assert "dropped, never truncated" in dropped.reason and str(least) in dropped.reason


@pytest.mark.parametrize("family", known_families())
def test_fit_is_monotone_deterministic_and_maximal(family):
    min_pixels, max_pixels = video_bounds(family)
    full = plan_total(family, REQUESTED, max_pixels)
    previous = None
    for max_tokens in [*range(full + 20, 100, -max(1, full // 40)), 100]:  # 100 = other_tokens: nothing fits
        decision = fit(family, max_tokens)
        assert decision == fit(family, max_tokens)  # deterministic
        if not decision.keep:
            previous = (0, 0)
            continue
        assert previous != (0, 0), "a larger cap dropped a sample that a smaller cap kept"
        assert decision.total_tokens <= max_tokens
        assert decision.total_tokens == plan_total(family, decision.plans[0].frame_indices, decision.max_pixels)
        count = decision.plans[0].num_frames
        assert count == 16 or (count % 2 == 0 and count >= SPEC.min_frames)
        if previous is not None:
            assert frame_key(decision) <= previous  # (pixels, frames) never grows as the cap shrinks
        previous = frame_key(decision)
        if decision.pixels_lowered:
            # frames first: at the configured pixels no allowed frame count fitted ...
            assert all(plan_total(family, request().frames_for(n), max_pixels) > max_tokens for n in ALLOWED)
            # ... so the pixels are lowered for the fewest frames, to the largest budget that fits
            assert count == SPEC.min_frames
            assert plan_total(family, request().frames_for(count), decision.max_pixels + 1) > max_tokens
        else:
            # at the configured pixels: the most frames that fit
            more = [n for n in ALLOWED if n > decision.plans[0].num_frames]
            assert all(plan_total(family, request().frames_for(n), max_pixels) > max_tokens for n in more)
    assert previous == (0, 0)  # the sweep ends in drops


@pytest.mark.parametrize("family", known_families())
def test_fit_decision_is_what_the_processor_produces(family):
    """Process the frames and pixel bound the decision chose: exactly its planned length, under the cap."""
    processor = processor_for(family)
    min_pixels, max_pixels = video_bounds(family)
    text = f"<|im_start|>user\nWhat is done in {VIDEO}?<|im_end|>\n<|im_start|>assistant\nClipping.<|im_end|>\n"
    other_tokens = count_text_tokens(text, processor)
    at_floor = min(plan_total(family, request().frames_for(n), max_pixels, other_tokens) for n in ALLOWED)
    for max_tokens in (plan_total(family, REQUESTED, max_pixels, other_tokens) - 1, at_floor - 1):
        decision = fit(family, max_tokens, other_tokens=other_tokens)
        plan = decision.plans[0]
        frames_THWC = np.full((plan.num_frames, LONG_VIDEO.height, LONG_VIDEO.width, 3), 90, dtype=np.uint8)
        clip = clip_of(LONG_VIDEO, list(plan.frame_indices), frames_THWC)
        outputs = processor(
            text=[text],
            videos=[clip.frames_THWC],
            video_metadata=[video_metadata_for_clip(clip, clip_start_s=SPEC.start_s)],
            videos_kwargs=size_kwargs(decision.min_pixels, decision.max_pixels),
            return_tensors="pt",
        )
        assert outputs["input_ids"].shape[1] == decision.total_tokens <= max_tokens
        assert tuple(outputs["video_grid_thw"][0].tolist()) == plan.grid_thw


def test_fewer_frames_cover_the_clip_uniformly():
    decision = fit("qwen2_5_vl", plan_total("qwen2_5_vl", REQUESTED, video_bounds("qwen2_5_vl")[1]) - 1)
    chosen = decision.plans[0].frame_indices
    assert chosen[0] == REQUESTED[0] and chosen[-1] == REQUESTED[-1] and set(chosen) <= set(REQUESTED)
    gaps = np.diff([REQUESTED.index(index) for index in chosen])
    assert gaps.max() - gaps.min() <= 1
    assert request().frames_for(1) == (REQUESTED[7],)

    # a custom selector (e.g. select_frames with num_frames=n) replaces the subset rule
    def select(num_frames: int) -> list[int]:
        return [108_000 + round(k * 240 / num_frames) for k in range(num_frames)]

    custom = fit("qwen2_5_vl", decision.total_tokens, videos=[request(select=select)])
    assert custom.plans[0].frame_indices == tuple(select(custom.plans[0].num_frames))


def test_allowed_frame_counts_keep_temporal_patch_multiples():
    from surgsigma_train.data.video.planning import _allowed_counts

    assert _allowed_counts(16, 4, 2) == [16, 14, 12, 10, 8, 6, 4]
    assert _allowed_counts(9, 3, 2) == [9, 8, 6, 4]  # 3 frames cost what 4 cost: never chosen
    assert _allowed_counts(5, 8, 2) == [5]  # fewer frames than min_frames requested: the request is the floor
    assert _allowed_counts(3, 3, 2) == [3]
    assert _allowed_counts(1, 1, 2) == [1]


def test_fit_drops_with_reasons():
    too_much_text = fit("qwen2_vl", max_tokens=50, other_tokens=60)
    assert not too_much_text.keep and "60 outside the videos" in too_much_text.reason
    single = request(frame_indices=(REQUESTED[0],))
    refused = fit("qwen3_vl", max_tokens=10_000, videos=[single])
    assert not refused.keep and refused.reason.startswith("cannot be planned") and refused.total_tokens == -1
    no_video = fit("qwen2_vl", max_tokens=100, videos=[], other_tokens=90)
    assert no_video.keep and no_video.total_tokens == 90


def test_fit_shares_one_frame_cap_and_pixel_budget_across_videos():
    family = "qwen2_5_vl"
    short = request(frame_indices=REQUESTED[:6], min_frames=2)
    full = fit(family, 100_000, videos=[request(), short])
    assert [p.num_frames for p in full.plans] == [16, 6]
    tight = fit(family, full.total_tokens - 1, videos=[request(), short])
    assert tight.keep and tight.plans[0].num_frames < 16
    # the short clip is only cut once the shared cap goes below its 6 frames
    assert tight.plans[1].num_frames == min(6, tight.plans[0].num_frames)
    assert len({p.max_pixels for p in tight.plans}) == 1


@pytest.mark.parametrize("family", known_families())
def test_tokens_never_decrease_with_max_pixels(family):
    """The bisection over max_pixels relies on this, for both Qwen resize rules."""
    rng = np.random.default_rng(7)
    processor, factor = processor_for(family), factor_of(family)
    for _ in range(30):
        height, width = random_height_width(rng, refusable=False)
        num_frames = int(rng.integers(2, 10))
        meta = VideoMeta(path="m.mp4", num_frames=100, fps=10.0, duration_s=10.0, width=width, height=height)
        per = num_frames if family == "qwen3_vl" else 1
        min_pixels = factor**2 * per
        budgets = sorted(int(b) for b in rng.integers(min_pixels, 64 * factor**2 * per, 12))
        tokens = [
            plan_video(meta, list(range(num_frames)), family, processor, min_pixels=min_pixels, max_pixels=b).num_tokens
            for b in budgets
        ]
        assert tokens == sorted(tokens), (height, width, num_frames, budgets, tokens)


def test_timestamp_origin_modes():
    meta = VideoMeta(path="v.mp4", num_frames=1000, fps=10.0, duration_s=100.0, width=64, height=64)
    clip = video_metadata_for_frames(meta, [500, 505], clip_start_s=49.5)
    source = video_metadata_for_frames(meta, [500, 505], clip_start_s=49.5, timestamps="source")
    whole = video_metadata_for_frames(meta, [500, 505])
    assert clip.timestamps == pytest.approx([0.5, 1.0]) and source.timestamps == [50.0, 50.5] == whole.timestamps
    assert clip.sampled_fps == source.sampled_fps == 2.0
    with pytest.raises(ValueError, match="'clip' or 'source'"):
        video_metadata_for_frames(meta, [1], timestamps="file")  # type: ignore[arg-type]
    assert math.isclose(clip.seconds_per_frame, 0.5)


def test_decode_time_resize_is_planned_with_the_frame_size():
    processor = processor_for("qwen2_vl")
    meta = VideoMeta(path="v.mp4", num_frames=100, fps=25.0, duration_s=4.0, width=1920, height=1080)
    resized = plan_video(
        meta, [0, 10], "qwen2_vl", processor, min_pixels=None, max_pixels=None, frame_size_HW=(90, 160)
    )
    frames_THWC = np.zeros((2, 90, 160, 3), dtype=np.uint8)
    outputs = processor(text=[VIDEO], videos=[frames_THWC], video_metadata=[video_metadata_for_frames(meta, [0, 10])])
    assert list(outputs["video_grid_thw"][0]) == list(resized.grid_thw)


# ---- a real variable-frame-rate file through the decoding pipeline -----------------------------------------------
@pytest.mark.parametrize("family", known_families())
def test_real_vfr_file_planned_before_decoding(family, videos):
    """probe -> select_frames -> plan (no decoding) == load_clip -> processor, with the file's real frame times."""
    from surgsigma_train.data.video import load_clip, probe, select_frames

    processor = processor_for(family)
    path = str(videos["vfr"])
    spec = SamplingSpec(fps=None, num_frames=6, min_frames=2, max_frames=8, start_s=0.5, end_s=4.5)
    meta = probe(path)
    indices = select_frames(meta, spec, sample_key="clip-1", epoch=0)
    min_pixels, max_pixels = video_bounds(family)
    plan = plan_video(
        meta, indices, family, processor, min_pixels=min_pixels, max_pixels=max_pixels, clip_start_s=spec.start_s
    )
    clip = load_clip(path, spec, sample_key="clip-1", epoch=0)
    assert clip.frame_indices == plan.frame_indices
    assert clip.timestamps_s == pytest.approx(plan.frame_times_s)
    intervals = np.diff(clip.timestamps_s)
    assert intervals.max() > 1.5 * intervals.min()  # really irregular

    outputs = processor(
        text=[VIDEO],
        videos=[clip.frames_THWC],
        video_metadata=[video_metadata_for_clip(clip, clip_start_s=spec.start_s)],
        videos_kwargs=size_kwargs(min_pixels, max_pixels),
        return_tensors="pt",
        return_text_replacement_offsets=True,
    )
    assert outputs["input_ids"].shape[1] == plan.num_tokens
    times = [t - spec.start_s for t in clip.timestamps_s]
    if family == "qwen3_vl":
        expected = [f"<{(times[i] + times[i + 1]) / 2:.1f} seconds>" for i in range(0, 6, 2)]
        replacement = outputs["text_replacement_offsets"][0][0]["replacement"]
        assert re.findall(r"<[0-9.]+ seconds>", replacement) == expected
    if family == "qwen2_5_vl":
        expected_s = 2 * (times[-1] - times[0]) / 5
        assert float(outputs["second_per_grid_ts"][0]) == pytest.approx(expected_s, rel=1e-6)
