"""Per-family processors on a text with one image and one video: expansion, token types, offsets."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

from surgsigma_train.models import get_family, known_families

IMAGE_PAD, VIDEO_PAD = 151655, 151656
VISION_START, VISION_END = 151652, 151653


def run_processor(processor, conversation, media, **kwargs):
    image_HWC, frames_THWC, metadata = media
    text = processor.apply_chat_template(conversation, tokenize=False)
    outputs = processor(
        text=[text],
        images=[image_HWC],
        videos=[frames_THWC],
        video_metadata=[copy.deepcopy(metadata)],
        return_tensors="pt",
        return_text_replacement_offsets=True,
        return_offsets_mapping=True,
        **kwargs,
    )
    return text, outputs


@pytest.mark.parametrize("family", known_families())
def test_one_image_one_video(family, processor_for, conversation, media):
    processor = processor_for(family)
    merge = processor.image_processor.merge_size
    text, outputs = run_processor(processor, conversation, media)
    input_ids = outputs["input_ids"][0]

    image_tokens = int(outputs["image_grid_thw"][0].prod()) // merge**2
    video_tokens = int(outputs["video_grid_thw"][0].prod()) // merge**2
    assert int((input_ids == IMAGE_PAD).sum()) == image_tokens > 0
    assert int((input_ids == VIDEO_PAD).sum()) == video_tokens > 0
    assert outputs["pixel_values"].shape[0] == int(outputs["image_grid_thw"][0].prod())
    assert outputs["pixel_values_videos"].shape[0] == int(outputs["video_grid_thw"][0].prod())
    assert outputs["video_grid_thw"][0, 0] == 4  # 8 frames, temporal patch 2

    # 0 text, 1 image, 2 video: exactly at the pad tokens
    expected_types = torch.zeros_like(input_ids)
    expected_types[input_ids == IMAGE_PAD] = 1
    expected_types[input_ids == VIDEO_PAD] = 2
    assert torch.equal(outputs["mm_token_type_ids"][0], expected_types)

    # replacement offsets: placeholder span in `text` -> expanded span in the expanded text
    replacements = outputs["text_replacement_offsets"][0]
    assert [item["type"] for item in replacements] == ["image", "video"]
    for item in replacements:
        start, end = item["span"]
        assert text[start:end] == item["text"]
        new_start, new_end = item["new_span"]
        assert new_end - new_start == len(item["replacement"])
    assert replacements[0]["replacement"] == "<|image_pad|>" * image_tokens

    # offset mapping: one (start, end) per token, into the expanded text, monotone
    offsets = outputs["offset_mapping"][0]
    assert offsets.shape == (len(input_ids), 2)
    assert torch.all(offsets[1:, 0] >= offsets[:-1, 0])
    expanded_length = len(text) + sum(len(r["replacement"]) - len(r["text"]) for r in replacements)
    assert int(offsets[-1, 1]) == expanded_length

    # the assistant answer maps back to its tokens through the offsets
    answer = conversation[-1]["content"]
    answer_start = text.index(answer) + sum(len(r["replacement"]) - len(r["text"]) for r in replacements)
    in_answer = (offsets[:, 0] >= answer_start) & (offsets[:, 1] <= answer_start + len(answer))
    assert processor.tokenizer.decode(input_ids[in_answer]) == answer


def test_qwen2_5_second_per_grid_ts_from_metadata(processor_for, conversation, media):
    _, outputs = run_processor(processor_for("qwen2_5_vl"), conversation, media)
    # 8 of 240 frames at 30 fps were sampled: 1 frame/s, so a temporal patch of 2 frames spans 2 s
    assert outputs["second_per_grid_ts"].tolist() == [2.0]


def test_qwen3_timestamps_from_metadata(processor_for, conversation, media):
    processor = processor_for("qwen3_vl")
    _, metadata_before = media[1], copy.deepcopy(media[2])
    _, outputs = run_processor(processor, conversation, media)
    video_text = outputs["text_replacement_offsets"][0][1]["replacement"]
    # frames 0,15,...,105 at 30 fps, averaged per temporal patch of 2 frames
    assert [part.split(" seconds>")[0] for part in video_text.split("<")[1:] if "seconds>" in part] == [
        "0.2",
        "1.2",
        "2.2",
        "3.2",
    ]
    ids = outputs["input_ids"][0]
    # one <|vision_start|> ... <|vision_end|> per temporal patch, plus the template's outer pair around the image;
    # transformers up to 5.24 also kept the outer pair around the video, 5.25 collapses it (the planner follows
    # whatever the installed processor emits: tests/data/video/test_video_planning.py)
    video_outer_pairs = 0 if Version(transformers.__version__) >= Version("5.25") else 1
    assert int((ids == VISION_START).sum()) == 4 + 1 + video_outer_pairs
    assert int((ids == VISION_END).sum()) == 4 + 1 + video_outer_pairs
    assert media[2] == metadata_before


@pytest.mark.parametrize("family", known_families())
def test_text_only_and_image_only(family, processor_for):
    processor = processor_for(family)
    outputs = processor(text=["<|im_start|>user\nHello<|im_end|>\n"], return_tensors="pt")
    assert torch.all(outputs["mm_token_type_ids"] == 0)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    outputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    assert "pixel_values_videos" not in outputs
    assert int((outputs["mm_token_type_ids"] == 1).sum()) == int(outputs["image_grid_thw"].prod()) // 4


@pytest.mark.parametrize("family", known_families())
def test_processor_components(family, processor_for):
    processor = processor_for(family)
    model_family = get_family(family)
    assert isinstance(processor, model_family.processor_class)
    assert isinstance(processor.video_processor, model_family.video_processor_class)
    assert processor.chat_template == model_family.chat_template
    assert (
        processor.image_processor.patch_size
        == processor.video_processor.patch_size
        == model_family.vision_defaults.patch_size
    )
    bounds = processor.image_processor.size
    assert (bounds.shortest_edge, bounds.longest_edge) == (
        16 * processor.image_processor.patch_size**2 * 4,
        64 * processor.image_processor.patch_size**2 * 4,
    )


@pytest.mark.integration
@pytest.mark.parametrize("family", known_families())
def test_save_and_reload_round_trip(family, processor_for, pixel_bounds, tmp_path, conversation, media):
    """An exported processor names the stock classes and rebuilds (offline, from the directory) identically."""
    processor = processor_for(family)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == get_family(family).stock_processor_class_name
    assert saved["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert saved["video_processor"]["video_processor_type"] == get_family(family).video_processor_class.stock_class_name

    rebuilt = get_family(family).build_processor(str(tmp_path), **pixel_bounds[family])
    assert type(rebuilt) is type(processor)
    _, expected = run_processor(processor, conversation, media)
    _, actual = run_processor(rebuilt, conversation, media)
    for key in (
        "input_ids",
        "mm_token_type_ids",
        "pixel_values",
        "pixel_values_videos",
        "image_grid_thw",
        "video_grid_thw",
    ):
        assert torch.equal(actual[key], expected[key]), key
