"""Box conventions: parsing every SurgΣ-DB form, quarantining corrupted ones, rendering per family, round trips."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from surgsigma_train.config.schema import DEFAULT_TASK_IDS, DataConfig, VideoConfig
from surgsigma_train.data.boxes import (BOX_FAMILIES, Box, BoxError, box_problem, box_renderer, parse_answer,
                                        parse_boxes, render_answer)
from surgsigma_train.data.encode import EncodeError, SampleEncoder
from surgsigma_train.data.readers import read_file
from surgsigma_train.data.sample import MediaRef, Message, Sample
from surgsigma_train.data.video.planning import plan_image
from surgsigma_train.models.registry import get_family

TOKENS = "<|object_ref_start|>hook<|object_ref_end|><|box_start|>(369,0),(877,567)<|box_end|>"


def test_qwen2_vl_grid_pairs_with_labels():
    parsed = parse_boxes("grasper (10,20),(300,400); hook (369,0),(877,567)")
    assert parsed.boxes == (Box(0.01, 0.02, 0.3, 0.4, "grasper"), Box(0.369, 0.0, 0.877, 0.567, "hook"))
    assert parsed.parts == ("", "; ", "") and parsed.conventions == {"grid_pairs"} and not parsed.no_objects


def test_special_token_segments():
    parsed = parse_boxes(f"Found: {TOKENS} and <|box_start|>(1,2),(3,4)<|box_end|>.")
    assert parsed.boxes == (Box(0.369, 0.0, 0.877, 0.567, "hook"), Box(0.001, 0.002, 0.003, 0.004, None))
    assert parsed.parts == ("Found: ", " and ", ".") and parsed.conventions == {"qwen_tokens"}


@pytest.mark.parametrize("text, label, parts", [
    ("[0.282, 0.452, 0.447, 0.752]", None, ("", "")),
    ("gallbladder: [0.282, 0.452, 0.447, 0.752]", "gallbladder", ("", "")),
    ("The liver is at [0.282, 0.452, 0.447, 0.752].", None, ("The liver is at ", ".")),  # a sentence, not a label
])
def test_normalised_float_lists(text, label, parts):
    parsed = parse_boxes(text)
    assert parsed.boxes == (Box(0.282, 0.452, 0.447, 0.752, label),) and parsed.parts == parts
    assert parsed.conventions == {"unit_list"}


@pytest.mark.parametrize("text", ["No tools detected.", "There are no instruments in this frame.", "None"])
def test_no_objects_is_recognised_not_a_failure(text):
    parsed = parse_boxes(text)
    assert parsed.boxes == () and parsed.no_objects and parsed.parts == (text,)
    assert box_problem(text, expect_boxes=True) is None
    assert all(render_answer(text, f, (10, 10)) == text for f in BOX_FAMILIES)


def test_text_without_boxes_is_not_no_objects():
    assert not parse_boxes("The hook is visible.").no_objects
    assert "no box" in box_problem("The hook is visible.", expect_boxes=True)


@pytest.mark.parametrize("text, reason", [
    ("<|object_ref_start|>hook<|object_ref_end|><|box_start|>(36a9,0),(877,567)<|box_end|>",
     "'36a9' is not an integer"),
    ("<|object_ref_start|>hook<|object_ref_end|><|box_start|>(369,0),(877,", "unbalanced special token <|box_start|>"),
    ("<|box_start|>(369, the,0)<|box_end|>", "'the' is not an integer"),
    ("<|box_start|>(369,0)<|box_end|>", "2 coordinates, expected 4"),
    ("<|box_start|>(369,0),(877,1567)<|box_end|>", "outside the 0-1000 grid"),
    ("<|box_start|>(877,0),(369,567)<|box_end|>", "x2 < x1"),
    ("<|object_ref_start|>hook<|box_start|>(369,0),(877,567)<|box_end|>", "unbalanced special token"),
])
def test_corrupted_special_token_boxes_are_quarantined(text, reason):
    problem = box_problem(text)
    assert problem is not None and reason in problem
    with pytest.raises(BoxError, match=reason.replace("(", r"\(").replace("|", r"\|")):
        parse_boxes(text)


@pytest.mark.parametrize("text, reason", [
    ("hook (36a9,0),(877,567)", "unparseable box-like text '(36a9,0'"),
    ("grasper (1,2),(3,4); hook (369,0),(877,", "unparseable box-like text '(369,0'"),
    ("[369, 0, 877, 567]", "outside [0, 1]"),
    ("hook (369,0),(1877,567)", "outside the 0-1000 grid"),
])
def test_corrupted_plain_boxes_only_count_where_boxes_are_expected(text, reason):
    assert reason in box_problem(text, expect_boxes=True)
    assert box_problem(text) is None  # e.g. a caption: only special-token segments are checked there


def test_good_answers_have_no_problem():
    for text in (TOKENS, "hook (369,0),(877,567)", "[0.282, 0.452, 0.447, 0.752]", "Phase: Preparation."):
        assert box_problem(text) is None
    for text in (TOKENS, "hook (369,0),(877,567)", "[0.282, 0.452, 0.447, 0.752]"):
        assert box_problem(text, expect_boxes=True) is None


def test_render_whole_answers_per_family():
    text = "Boxes: grasper (10,20),(300,400); hook (369,0),(877,567)."
    assert render_answer(text, "qwen2_vl") == (
        "Boxes: <|object_ref_start|>grasper<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>; "
        "<|object_ref_start|>hook<|object_ref_end|><|box_start|>(369,0),(877,567)<|box_end|>.")
    assert render_answer(text, "qwen3_vl") == (
        'Boxes: {"bbox_2d": [10, 20, 300, 400], "label": "grasper"}; '
        '{"bbox_2d": [369, 0, 877, 567], "label": "hook"}.')
    # 476x840 resized image: x * 840, y * 476, rounded half up
    assert render_answer(text, "qwen2_5_vl", (476, 840)) == (
        'Boxes: {"bbox_2d": [8, 10, 252, 190], "label": "grasper"}; '
        '{"bbox_2d": [310, 0, 737, 270], "label": "hook"}.')
    floats = "The liver is at [0.282, 0.452, 0.447, 0.752]."
    assert render_answer(floats, "qwen2_vl") == "The liver is at <|box_start|>(282,452),(447,752)<|box_end|>."
    assert render_answer(floats, "qwen2_5_vl", (100, 200)) == 'The liver is at {"bbox_2d": [56, 45, 89, 75]}.'
    assert render_answer(TOKENS, "qwen3_vl") == '{"bbox_2d": [369, 0, 877, 567], "label": "hook"}'
    with pytest.raises(ValueError, match="resized_hw is required"):
        render_answer(text, "qwen2_5_vl")
    with pytest.raises(ValueError, match="no box convention"):
        render_answer(text, "llava")


def _resized_hw(family: str, processor, height: int, width: int) -> tuple[int, int]:
    plan = plan_image(height, width, family, processor)
    return plan.resized_height, plan.resized_width


@pytest.mark.parametrize("family", BOX_FAMILIES)
def test_round_trip_within_one_pixel(family):
    """canonical -> family convention -> canonical, 500 random boxes on random image sizes (up to 1920x1080)."""
    v = VideoConfig()  # the default pixel bounds decide the Qwen2.5-VL resize
    processor = get_family(family).build_processor(
        "tiny", image_min_pixels=v.image_min_pixels, image_max_pixels=v.image_max_pixels,
        video_min_pixels=v.video_min_pixels, video_max_pixels=v.video_max_pixels)
    rng = random.Random(0)
    worst = 0.0
    for _ in range(500):
        height, width = rng.randint(32, 1080), rng.randint(32, 1920)
        xs, ys = sorted(rng.random() for _ in range(2)), sorted(rng.random() for _ in range(2))
        box = Box(xs[0], ys[0], xs[1], ys[1], rng.choice(["hook", "clip applier", None]))
        resized = _resized_hw(family, processor, height, width)
        text = box_renderer(family, resized)(box)
        (back,) = parse_answer(text, family, resized).boxes
        assert back.label == box.label
        errors = [abs(back.x1 - box.x1) * width, abs(back.x2 - box.x2) * width,
                  abs(back.y1 - box.y1) * height, abs(back.y2 - box.y2) * height]
        worst = max(worst, *errors)
        assert max(errors) <= 1.0, (family, height, width, resized, box, text)
    assert worst > 0.05  # quantisation really happened (the test is not comparing a box with itself)


def test_round_trip_error_is_half_a_grid_cell_at_any_size():
    rng = random.Random(1)
    for _ in range(300):
        xs, ys = sorted(rng.random() for _ in range(2)), sorted(rng.random() for _ in range(2))
        box = Box(xs[0], ys[0], xs[1], ys[1])
        hw = (rng.randint(1, 5000), rng.randint(1, 5000))
        for family, (cell_y, cell_x) in (("qwen3_vl", (1000, 1000)), ("qwen2_vl", (1000, 1000)),
                                         ("qwen2_5_vl", hw)):
            (back,) = parse_answer(box_renderer(family, hw)(box), family, hw).boxes
            assert max(abs(back.x1 - box.x1), abs(back.x2 - box.x2)) <= 0.5 / cell_x + 1e-12
            assert max(abs(back.y1 - box.y1), abs(back.y2 - box.y2)) <= 0.5 / cell_y + 1e-12


# ---------------------------------------------------------------- readers
def test_surgsigma_file_quarantines_corrupted_boxes(tmp_path):
    q = "Locate the instruments."
    annos = [
        {"id": "good_grid", "images": ["i1"], "task type": [1], "question": q, "answer": "hook (369,0),(877,567)"},
        {"id": "good_tokens", "images": ["i1"], "task type": [1], "question": q, "answer": TOKENS},
        {"id": "good_unit", "images": ["i1"], "task type": [4], "question": "Where is the liver?",
         "answer": "liver [0.282, 0.452, 0.447, 0.752]"},
        {"id": "none", "images": ["i1"], "task type": [1], "question": q, "answer": "No tools detected."},
        {"id": "spliced", "images": ["i1"], "task type": [1], "question": q,
         "answer": "<|object_ref_start|>hook<|object_ref_end|><|box_start|>(36a9,0),(877,567)<|box_end|>"},
        {"id": "cut", "images": ["i1"], "task type": [1], "question": q,
         "answer": "<|object_ref_start|>hook<|object_ref_end|><|box_start|>(369,0),(877,"},
        {"id": "caption_tokens", "images": ["i1"], "task type": [12], "question": "Describe.",
         "answer": "A hook <|box_start|>(369, the,0)<|box_end|> dissects."},
        {"id": "plain_broken", "images": ["i1"], "task type": [1], "question": q, "answer": "hook (36a9,0),(877,567)"},
    ]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"images": [{"id": "i1", "image path": "CholecT50/videos/VID02/000509.png"}],
                                "annos": annos}))
    samples, report = read_file(path, "auto", DEFAULT_TASK_IDS, tmp_path)
    assert [s.id for s in samples] == ["good_grid", "good_tokens", "good_unit", "none"]
    reasons = {b.record: b.reason for b in report.bad}
    assert set(reasons) == {"spliced", "cut", "caption_tokens", "plain_broken"}
    assert all(r.startswith("quarantined: ") for r in reasons.values())
    assert "'36a9' is not an integer" in reasons["spliced"] and "unbalanced" in reasons["cut"]
    assert "'the' is not an integer" in reasons["caption_tokens"] and "'(36a9,0'" in reasons["plain_broken"]
    assert all(b.file == str(path) for b in report.bad)


def test_llava_assistant_turn_with_corrupted_tokens_is_quarantined(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([
        {"id": "ok", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>Where?"}, {"from": "gpt", "value": TOKENS}]},
        {"id": "bad", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>Where?"}, {"from": "gpt", "value": "<|box_start|>(369,0)<|box_end|>"}]},
    ]))
    samples, report = read_file(path, "auto", DEFAULT_TASK_IDS, tmp_path)
    assert [s.id for s in samples] == ["ok"]
    assert report.bad[0].record == "bad" and "quarantined: " in report.bad[0].reason
    assert "2 coordinates, expected 4" in report.bad[0].reason


# ---------------------------------------------------------------- encoding
IMAGE_BOUNDS = dict(image_min_pixels=28 * 28, image_max_pixels=28 * 28 * 20, video_min_pixels=28 * 28,
                    video_max_pixels=56 * 56)


def _encoder(family: str, **data_kw) -> SampleEncoder:
    fam = get_family(family)
    return SampleEncoder(fam.build_processor("tiny", **IMAGE_BOUNDS), fam,
                         DataConfig(train=[{"path": "x"}], **data_kw), VideoConfig(**IMAGE_BOUNDS))


def _localization_sample(root, answer="grasper (10,20),(300,400); hook (369,0),(877,567)") -> Sample:
    return Sample(id="loc", task="instrument_localization", media_root=str(root), media=(MediaRef("image", "f.png"),),
                  messages=(Message("user", "<image>Locate the instruments."), Message("assistant", answer)))


def _supervised(enc, encoded) -> str:
    return enc.tokenizer.decode(encoded.input_ids[encoded.labels != -100])


def test_encoded_qwen2_5_vl_target_has_pixel_boxes_of_the_resized_image(tmp_path):
    Image.fromarray(np.zeros((120, 200, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    enc = _encoder("qwen2_5_vl")
    encoded = enc.encode(_localization_sample(tmp_path))
    # the size the processor really resized to, from its own output (patch 14): not from our planning code
    _, rows, cols = encoded.vision["image_grid_thw"][0].tolist()
    height, width = rows * 14, cols * 14
    assert (height, width) != (120, 200)  # the image was resized, so pixels differ from the original's
    hook = [round(0.369 * width), 0, round(0.877 * width), round(0.567 * height)]
    expected = f'{{"bbox_2d": {json.dumps(hook)}, "label": "hook"}}'
    assert expected in _supervised(enc, encoded)
    assert '"label": "grasper"}; {"bbox_2d"' in _supervised(enc, encoded)
    assert expected in enc.encode_prompt(_localization_sample(tmp_path)).reference  # eval compares the same form
    kept = _encoder("qwen2_5_vl", box_format="keep")
    assert "hook (369,0),(877,567)<|im_end|>" in _supervised(kept, kept.encode(_localization_sample(tmp_path)))


def test_encoded_qwen2_vl_target_uses_grounding_tokens(tmp_path):
    Image.fromarray(np.zeros((120, 200, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    enc = _encoder("qwen2_vl")
    target = _supervised(enc, enc.encode(_localization_sample(tmp_path)))
    assert target.endswith("<|object_ref_start|>hook<|object_ref_end|><|box_start|>(369,0),(877,567)<|box_end|>"
                           "<|im_end|>")
    none = _localization_sample(tmp_path, answer="No tools detected.")
    assert _supervised(enc, enc.encode(none)) == "No tools detected.<|im_end|>"


def test_qwen2_5_vl_pixel_boxes_need_one_image(tmp_path):
    sample = _localization_sample(tmp_path)
    sample = Sample(**{**sample.__dict__, "media": (MediaRef("image", "f.png"), MediaRef("image", "g.png")),
                       "messages": (Message("user", "<image><image>Locate."), sample.messages[1])})
    with pytest.raises(EncodeError, match="exactly one image"):
        _encoder("qwen2_5_vl").answer_target(sample, sample.messages[-1].content)
