"""Encoding on the real Qwen tokenizer and processors: the loss mask covers exactly the assistant spans."""

import numpy as np
import pytest
import torch
from PIL import Image

from surgsigma_train.config.schema import DataConfig, VideoConfig
from surgsigma_train.data.encode import IGNORE_INDEX, EncodeError, SampleEncoder
from surgsigma_train.data.media import MediaError
from surgsigma_train.data.sample import MediaRef, Message, Sample
from surgsigma_train.models.registry import get_family

from tests.data.test_media import write_counter_video

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SMALL = dict(image_min_pixels=28 * 28, image_max_pixels=56 * 56, video_min_pixels=28 * 28, video_max_pixels=56 * 56)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(root / "a.png")
    write_counter_video(root / "v.mp4", num_frames=16)
    return root


def encoder(family: str, **data_kw) -> SampleEncoder:
    fam = get_family(family)
    processor = fam.build_processor("tiny", **SMALL)
    data = DataConfig(train=[{"path": "x"}], **data_kw)
    return SampleEncoder(processor, fam, data, VideoConfig(sampling={"num_frames": 4}, **SMALL))


def sample(root, **kw) -> Sample:
    defaults = dict(
        id="s1", media_root=str(root), task="phase_recognition",
        media=(MediaRef("image", "a.png"), MediaRef("video", "v.mp4")),
        messages=(Message("user", "<image>What phase?"), Message("assistant", "Preparation."),
                  Message("user", "And here? <video>"), Message("assistant", "The action is clipping.")),
    )
    return Sample(**{**defaults, **kw})


def supervised_text(enc, encoded) -> list[str]:
    """Each contiguous run of supervised tokens, decoded."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [enc.tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_assistant_turns(family, media_root):
    enc = encoder(family)
    out = enc.encode(sample(media_root))
    assert supervised_text(enc, out) == ["Preparation.<|im_end|>", "The action is clipping.<|im_end|>"]
    assert torch.equal(out.labels[out.labels != IGNORE_INDEX], out.input_ids[out.labels != IGNORE_INDEX])
    tok = enc.tokenizer
    image_id, video_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")
    assert torch.equal(out.mm_token_type_ids == 1, out.input_ids == image_id)
    assert torch.equal(out.mm_token_type_ids == 2, out.input_ids == video_id)
    merge = 4  # 2x2 spatial merge
    assert int((out.input_ids == image_id).sum()) == int(out.vision["image_grid_thw"].prod()) // merge
    assert int((out.input_ids == video_id).sum()) == int(out.vision["video_grid_thw"].prod()) // merge
    assert out.id == "s1" and out.task == "phase_recognition"


def test_reasoning_formats_and_loss_switch(media_root):
    s = sample(media_root, thinking="Level 1: a hook. Level 2: dissects. Level 3: clipping phase.")
    plain = encoder("qwen2_5_vl", reasoning="plain")
    assert supervised_text(plain, plain.encode(s))[-1] == "The action is clipping.<|im_end|>"
    both = encoder("qwen2_5_vl", reasoning="reasoning")
    target = "<think> Level 1: a hook. Level 2: dissects. Level 3: clipping phase. </think><answer> " \
             "The action is clipping. </answer><|im_end|>"
    assert supervised_text(both, both.encode(s))[-1] == target
    answer_only = encoder("qwen2_5_vl", reasoning="reasoning", reasoning_loss=False)
    # `><` straddles `</think>` and `<answer>`: it is generated, so it is supervised
    assert supervised_text(answer_only, answer_only.encode(s))[-1] == "><answer> The action is clipping. </answer><|im_end|>"
    # mix: a stable per-sample choice close to the ratio
    mix = encoder("qwen2_5_vl", reasoning="mix", reasoning_ratio=0.3)
    picks = [mix.use_reasoning(sample(media_root, id=f"s{i}", thinking="t")) for i in range(2000)]
    assert 0.26 < sum(picks) / len(picks) < 0.34
    assert picks == [mix.use_reasoning(sample(media_root, id=f"s{i}", thinking="t")) for i in range(2000)]


def test_system_prompt_is_not_supervised(media_root):
    enc = encoder("qwen2_vl", system_prompt="You are a surgical assistant.")
    out = enc.encode(sample(media_root))
    assert "You are a surgical assistant." in enc.tokenizer.decode(out.input_ids)
    assert supervised_text(enc, out) == ["Preparation.<|im_end|>", "The action is clipping.<|im_end|>"]


def test_too_long_is_refused_not_truncated(media_root):
    enc = encoder("qwen2_5_vl", max_seq_len=40)
    with pytest.raises(EncodeError, match="never truncated|not truncated"):
        enc.encode(sample(media_root))


def test_token_budget_lowers_video_frames_before_dropping(media_root):
    full = encoder("qwen2_5_vl").encode(sample(media_root))
    assert full.vision["video_grid_thw"][0, 0] == 2  # 4 frames / temporal patch 2
    budget = full.input_ids.numel() - 1  # one token too many: the planner must take frames away
    fitted = encoder("qwen2_5_vl", max_seq_len=budget).encode(sample(media_root))
    assert fitted.vision["video_grid_thw"][0, 0] == 1 and fitted.input_ids.numel() <= budget
    # the answer is still supervised in full
    assert supervised_text(encoder("qwen2_5_vl"), fitted)[-1] == "The action is clipping.<|im_end|>"


def test_missing_media_names_the_file(media_root):
    enc = encoder("qwen2_5_vl")
    with pytest.raises(MediaError, match="missing.png"):
        enc.encode(sample(media_root, media=(MediaRef("image", "missing.png"), MediaRef("video", "v.mp4"))))


def test_prompt_encoding_ends_with_generation_prompt(media_root):
    enc = encoder("qwen3_vl")
    out = enc.encode_prompt(sample(media_root))
    assert enc.tokenizer.decode(out.input_ids).endswith("And here? <|vision_end|><|im_end|>\n<|im_start|>assistant\n") \
        or enc.tokenizer.decode(out.input_ids).endswith("<|im_start|>assistant\n")
    assert out.reference == "The action is clipping." and (out.labels == IGNORE_INDEX).all()


def test_each_video_file_is_probed_once_until_it_changes(media_root, monkeypatch, tmp_path):
    import surgsigma_train.data.encode as encode_module

    probed = []
    real_probe = encode_module.probe
    monkeypatch.setattr(encode_module, "probe", lambda path, backend: probed.append(str(path)) or real_probe(path, backend))
    enc = encoder("qwen2_5_vl")
    enc.encode(sample(media_root, id="a"))
    enc.encode(sample(media_root, id="b"))  # same source video, another sample
    assert len(probed) == 1
    root = tmp_path / "changing"
    root.mkdir()
    (root / "a.png").write_bytes((media_root / "a.png").read_bytes())
    write_counter_video(root / "v.mp4", num_frames=16)
    enc.encode(sample(root))
    write_counter_video(root / "v.mp4", num_frames=24)  # rewritten: a different file now
    out = enc.encode(sample(root))
    assert len(probed) == 3 and out.input_ids.numel() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_cache_stores_resized_frames_and_patches_stay_identical(family, media_root, tmp_path):
    fam = get_family(family)
    processor = fam.build_processor("tiny", **SMALL)
    data = DataConfig(train=[{"path": "x"}])
    plain = SampleEncoder(processor, fam, data, VideoConfig(sampling={"num_frames": 4}, **SMALL))
    cached = SampleEncoder(processor, fam, data, VideoConfig(sampling={"num_frames": 4}, cache_dir=str(tmp_path), **SMALL))
    import av  # a textured video (a flat one would resize to itself whatever the kernel)

    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes((media_root / "a.png").read_bytes())
    rng = np.random.default_rng(1)
    with av.open(str(root / "v.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        for _ in range(12):
            frame = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    s = sample(root)
    reference = plain.encode(s)
    text, _ = cached.render_with_spans(cached.conversation(s))
    for expected_state in ("miss", "hit"):
        _, clips, decision = cached.load_media(s, text)
        plan = decision.plans[0]
        assert clips[0].extra["cache"] == expected_state
        assert clips[0].frames_THWC.shape[1:3] == (plan.resized_height, plan.resized_width) != (72, 96)
        out = cached.encode(s)
        for key, value in reference.vision.items():
            assert torch.equal(out.vision[key], value), (family, expected_state, key)
        assert torch.equal(out.input_ids, reference.input_ids)
