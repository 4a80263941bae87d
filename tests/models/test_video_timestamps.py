"""Real frame times reach the model: Qwen2.5-VL second_per_grid_ts, Qwen3-VL timestamp text, stock parity."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from transformers.video_utils import VideoMetadata

from surgsigma_train.models import get_family, known_families
from surgsigma_train.models.qwen3_vl.processor import temporal_group_times_s
from surgsigma_train.models.video_processor import ClipVideoMetadata

VIDEO_TEXT = "<|im_start|>user\nWhat happens in <|vision_start|><|video_pad|><|vision_end|>?<|im_end|>\n"
HOUR_FRAMES_30FPS = 108_000  # a 1 h procedure at 30 fps


def frames_THWC(num_frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 56, 84, 3), dtype=np.uint8)


def clip_metadata(times_s: list[float], origin_s: float = 0.0, fps: float = 30.0) -> ClipVideoMetadata:
    return ClipVideoMetadata(
        total_num_frames=HOUR_FRAMES_30FPS,
        fps=fps,
        frames_indices=[round(time * fps) for time in times_s],
        frame_times_s=times_s,
        time_origin_s=origin_s,
    )


def run(processor, metadata, num_frames: int, **kwargs):
    return processor(
        text=[VIDEO_TEXT],
        videos=[frames_THWC(num_frames)],
        video_metadata=[metadata],
        return_tensors="pt",
        return_text_replacement_offsets=True,
        **kwargs,
    )


def timestamp_texts(outputs) -> list[str]:
    replacement = outputs["text_replacement_offsets"][0][0]["replacement"]
    return re.findall(r"<([0-9.]+) seconds>", replacement)


# ---- the metadata class ------------------------------------------------------------------------------------------
def test_clip_metadata_properties():
    metadata = clip_metadata([1800.0, 1800.5, 1801.0, 1801.5], origin_s=1800.0)
    assert metadata.timestamps == [0.0, 0.5, 1.0, 1.5]
    assert metadata.seconds_per_frame == 0.5 and metadata.sampled_fps == 2.0
    # the stock property on the same frames: 4 of 108000 frames at 30 fps -> 1 frame per 900 s
    plain = VideoMetadata(total_num_frames=HOUR_FRAMES_30FPS, fps=30.0, frames_indices=metadata.frames_indices)
    assert plain.sampled_fps == pytest.approx(4 / 3600)
    # a single frame has no interval: the source frame interval keeps it finite
    assert clip_metadata([12.0]).seconds_per_frame == pytest.approx(1 / 30)
    # mean interval of jittered frames = span / (n - 1)
    assert clip_metadata([0.0, 0.4, 1.1, 1.5]).seconds_per_frame == pytest.approx(0.5)


@pytest.mark.parametrize(
    "times, origin, message",
    [
        ([1.0, 0.5], 0.0, "non-decreasing"),
        ([1.0, 2.0], 1.5, "before the time origin"),
        ([], 0.0, "empty"),
        ([0.0, float("nan")], 0.0, "finite"),
    ],
)
def test_clip_metadata_refuses_inconsistent_times(times, origin, message):
    with pytest.raises(ValueError, match=message):
        ClipVideoMetadata(total_num_frames=10, fps=1.0, frame_times_s=times, time_origin_s=origin)


def test_clip_metadata_needs_times_and_matching_indices():
    with pytest.raises(ValueError, match="frame_times_s"):
        ClipVideoMetadata(total_num_frames=10, fps=1.0)
    with pytest.raises(ValueError, match="frames_indices"):
        ClipVideoMetadata(total_num_frames=10, fps=1.0, frames_indices=[0, 1, 2], frame_times_s=[0.0, 1.0])


@pytest.mark.parametrize("family", known_families())
def test_video_processor_keeps_the_class_and_leaves_the_callers_object_alone(family, processor_for):
    metadata = clip_metadata([100.0, 100.5, 101.0], origin_s=99.0)
    before = copy.deepcopy(metadata)
    outputs = processor_for(family).video_processor(
        videos=[frames_THWC(3)], video_metadata=[metadata], return_metadata=True
    )
    returned = outputs["video_metadata"][0]
    assert isinstance(returned, ClipVideoMetadata) and returned == metadata and returned is not metadata
    assert metadata == before


# ---- Qwen2.5-VL: second_per_grid_ts --------------------------------------------------------------------------------
def test_qwen2_5_second_per_grid_ts_of_a_clip_in_a_long_video(processor_for):
    processor = processor_for("qwen2_5_vl")
    # 4 frames over 2 s, 30 min into a 1 h video, temporal patch 2 -> 1.0 s per temporal patch
    times_s = [1800.0, 1800.5, 1801.0, 1801.5]
    outputs = run(processor, clip_metadata(times_s, origin_s=1800.0), 4)
    assert outputs["second_per_grid_ts"].tolist() == [1.0]
    # independent of the origin: clip-relative and source-relative times have the same intervals
    assert run(processor, clip_metadata(times_s, origin_s=0.0), 4)["second_per_grid_ts"].tolist() == [1.0]
    # the stock derivation on plain metadata (kept for plain metadata): len/total*fps -> 1800 s per patch
    plain = VideoMetadata(
        total_num_frames=HOUR_FRAMES_30FPS, fps=30.0, frames_indices=[54000, 54015, 54030, 54045]
    )
    assert run(processor, plain, 4)["second_per_grid_ts"].tolist() == [pytest.approx(1800.0)]


def test_qwen2_5_second_per_grid_ts_equals_stock_for_uniform_whole_video(processor_for):
    """Segment-centred frames of a whole constant-rate video: real interval = duration / n = the stock value."""
    processor = processor_for("qwen2_5_vl")
    indices = list(range(15, 240, 30))  # 8 frames of 240 at 30 fps, one per second
    plain = VideoMetadata(total_num_frames=240, fps=30.0, frames_indices=indices)
    timed = ClipVideoMetadata(
        total_num_frames=240, fps=30.0, frames_indices=indices, frame_times_s=[index / 30.0 for index in indices]
    )
    stock = run(processor, plain, 8)["second_per_grid_ts"].tolist()
    assert stock == [2.0] and run(processor, timed, 8)["second_per_grid_ts"].tolist() == pytest.approx(stock)


def test_qwen2_5_value_comes_from_the_stock_code_path(processor_for):
    """The fix lives in the metadata: transformers' own _process_videos computes the value, so the stock processor
    (torchvision machines, inference code) gives the same second_per_grid_ts for the same metadata."""
    from transformers import Qwen2_5_VLProcessor

    processor = processor_for("qwen2_5_vl")
    assert type(processor)._process_videos is Qwen2_5_VLProcessor._process_videos


def test_qwen2_5_position_ids_and_forward_follow_second_per_grid_ts(processor_for):
    """The tiny model's temporal positions advance by tokens_per_second x second_per_grid_ts per patch."""
    processor = processor_for("qwen2_5_vl")
    model = get_family("qwen2_5_vl").build_model("tiny", seed=0).eval()
    tokens_per_second = model.config.vision_config.tokens_per_second
    batches = {}
    for spacing_s in (0.5, 2.0):  # 6 frames -> 3 temporal patches of 1.0 s or 4.0 s
        times_s = [600.0 + spacing_s * k for k in range(6)]
        batches[spacing_s] = dict(run(processor, clip_metadata(times_s, origin_s=600.0), 6))
    assert batches[0.5]["second_per_grid_ts"].tolist() == [1.0]
    assert batches[2.0]["second_per_grid_ts"].tolist() == [4.0]

    temporal_starts = {}
    for spacing_s, batch in batches.items():
        position_ids, _ = model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            video_grid_thw=batch["video_grid_thw"],
            second_per_grid_ts=batch["second_per_grid_ts"],
            attention_mask=batch["attention_mask"],
        )
        is_video = batch["mm_token_type_ids"][0] == 2
        temporal_BL = position_ids[0]  # (3, B, L) -> the temporal row
        video_temporal = temporal_BL[0, is_video]
        first = int(video_temporal[0])
        temporal_starts[spacing_s] = sorted({int(t) - first for t in video_temporal})
    assert temporal_starts[0.5] == [0, 1 * tokens_per_second, 2 * tokens_per_second]
    assert temporal_starts[2.0] == [0, 4 * tokens_per_second, 8 * tokens_per_second]

    with torch.no_grad():
        logits = {spacing: model(**batch).logits for spacing, batch in batches.items()}
    text_positions = batches[0.5]["mm_token_type_ids"][0] == 0
    assert torch.equal(batches[0.5]["input_ids"], batches[2.0]["input_ids"])
    assert not torch.allclose(logits[0.5][0, text_positions], logits[2.0][0, text_positions])


# ---- Qwen3-VL: timestamp text ------------------------------------------------------------------------------------
def test_qwen3_variable_frame_rate_times_reach_the_text(processor_for):
    processor = processor_for("qwen3_vl")
    times_s = [10.0, 10.2, 11.0, 11.4, 13.0, 13.2]  # irregular spacing (VFR / jittered sampling)
    clip_relative = run(processor, clip_metadata(times_s, origin_s=10.0), 6)
    assert timestamp_texts(clip_relative) == ["0.1", "1.2", "3.1"]  # per temporal patch: mean of first and last
    source = run(processor, clip_metadata(times_s, origin_s=0.0), 6)
    assert timestamp_texts(source) == ["10.1", "11.2", "13.1"]
    # the index-derived stock text would be uniform in the indices instead
    plain = VideoMetadata(total_num_frames=HOUR_FRAMES_30FPS, fps=30.0, frames_indices=[300, 306, 330, 342, 390, 396])
    assert timestamp_texts(run(processor, plain, 6)) == ["10.1", "11.2", "13.1"]  # CFR indices: same here
    plain_uniform = VideoMetadata(total_num_frames=HOUR_FRAMES_30FPS, fps=30.0, frames_indices=list(range(0, 180, 30)))
    assert timestamp_texts(run(processor, plain_uniform, 6)) == ["0.5", "2.5", "4.5"]


def test_qwen3_clip_in_a_long_video_is_clip_relative_by_default(processor_for):
    processor = processor_for("qwen3_vl")
    times_s = [5400.0 + 0.5 * k for k in range(4)]  # 1 h 30 min into the procedure
    outputs = run(processor, clip_metadata(times_s, origin_s=5400.0), 4)
    assert timestamp_texts(outputs) == ["0.2", "1.2"]
    assert timestamp_texts(run(processor, clip_metadata(times_s, origin_s=0.0), 4)) == ["5400.2", "5401.2"]


def test_qwen3_odd_frame_count_pads_times_like_frames(processor_for):
    outputs = run(processor_for("qwen3_vl"), clip_metadata([2.0, 3.0, 4.0], origin_s=2.0), 3)
    assert timestamp_texts(outputs) == ["0.5", "2.0"]  # last patch = frame 3 twice
    assert temporal_group_times_s([0.0, 1.0, 2.0], 2) == [0.5, 2.0]


def test_qwen3_stock_parity_for_uniform_whole_video(processor_for):
    """Times index / fps from the file start give exactly the stock processor's output."""
    processor = processor_for("qwen3_vl")
    indices = [0, 15, 30, 45, 60, 75, 90, 105]
    plain = VideoMetadata(total_num_frames=240, fps=30.0, frames_indices=indices, width=84, height=56, duration=8.0)
    timed = ClipVideoMetadata(
        total_num_frames=240,
        fps=30.0,
        frames_indices=indices,
        width=84,
        height=56,
        duration=8.0,
        frame_times_s=[index / 30.0 for index in indices],
    )
    stock, ours = run(processor, plain, 8), run(processor, timed, 8)
    assert torch.equal(stock["input_ids"], ours["input_ids"])
    assert stock["text_replacement_offsets"] == ours["text_replacement_offsets"]
    assert timestamp_texts(ours) == ["0.2", "1.2", "2.2", "3.2"]


def test_qwen3_times_must_match_the_frames(processor_for):
    with pytest.raises(ValueError, match="temporal patches"):
        run(processor_for("qwen3_vl"), clip_metadata([0.0, 1.0]), 6)


def test_qwen2_vl_has_no_timestamps(processor_for):
    processor = processor_for("qwen2_vl")
    plain = VideoMetadata(total_num_frames=240, fps=30.0, frames_indices=[0, 15, 30, 45])
    timed = clip_metadata([100.0, 100.3, 101.0, 107.0], origin_s=100.0)
    stock, ours = run(processor, plain, 4), run(processor, timed, 4)
    assert torch.equal(stock["input_ids"], ours["input_ids"]) and "second_per_grid_ts" not in ours
