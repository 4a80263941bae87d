"""Packed rows vs the per-sample computation, on the real tiny models of all three families (CPU, fp32).

What is proven here:
- the transformers contract packing relies on (``data/packing.py`` docstring): [4, 1, T] position ids + no
  attention mask -> a block-diagonal causal mask (sdpa, eager) and the text row passed to the layers (what
  flash_attention_2 splits by); [3, 1, T] position ids -> NOT confined;
- ``token_loss_sum`` equals transformers' own ``model(labels=...).loss`` x supervised tokens (unpacked);
- loss and every parameter's gradient of a packed row equal the sum over its samples run alone (relative error
  <= 1e-5), LoRA and full fine-tuning, on single image / multi-image / video (real mp4, real timestamps) /
  text-only samples; wrong position ids or a leaking mask make that check fail;
- our ``sdpa_varlen`` backend gives the outputs of sdpa with the block-diagonal mask; backend selection and the
  ConfigErrors for backends that cannot serve packing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from surgsigma_train.config.schema import DataConfig, LoraConfig, ModelConfig, TrainConfig, VideoConfig
from surgsigma_train.data.encode import IGNORE_INDEX, EncodedSample, SampleEncoder
from surgsigma_train.data.loader import PadCollator
from surgsigma_train.data.packing import pack_encoded, packed_position_ids, unwrap_hf_model
from surgsigma_train.data.sample import MediaRef, Message, Sample
from surgsigma_train.errors import ConfigError
from surgsigma_train.models.attention import (
    SDPA_VARLEN,
    check_packing_confined,
    packed_segments,
    resolve_attn_implementation,
)
from surgsigma_train.models.registry import get_family
from surgsigma_train.training.params import apply_lora
from surgsigma_train.training.trainer import token_loss_sum

from tests.data.test_media import write_counter_video

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SMALL = dict(image_min_pixels=28 * 28, image_max_pixels=56 * 56, video_min_pixels=28 * 28, video_max_pixels=56 * 56)
TOLERANCE = 1e-5
# fp32 per-parameter gradient tolerance. The floor of fp32 itself: the per-sample sum vs the SAME samples as one
# padded batch (no packing involved) already differ by up to 1.1e-5 on single LoRA A matrices (median 2.5e-6; the
# packed row: 1.1e-5 / 2.3e-6), so 1e-5 per tensor cannot hold in fp32. fp32 asserts 1e-5 on the loss and on the
# whole gradient and 3e-5 per tensor; the float64 run in the negative test asserts 1e-5 (and 1e-9) per tensor.
FP32_PER_TENSOR = 3e-5


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing_media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (84, 56, 3), dtype=np.uint8)).save(root / "b.png")
    write_counter_video(root / "v.mp4", num_frames=24, fps=8)  # 3 s
    return root


_ENCODED: dict[str, list[EncodedSample]] = {}


def encoded_mix(family: str, root) -> list[EncodedSample]:
    """Image+video (two turns), text only, two images, a video clip: encoded by the real encoder, once per family."""
    if family not in _ENCODED:
        fam = get_family(family)
        processor = fam.build_processor("tiny", **SMALL)
        encoder = SampleEncoder(processor, fam, DataConfig(train=[{"path": "x"}]),
                                VideoConfig(sampling={"num_frames": 4}, **SMALL))

        def sample(sid, media, messages):
            return Sample(id=sid, media_root=str(root), task="phase_recognition", media=media,
                          messages=tuple(Message(role, text) for role, text in messages))

        samples = [
            sample("image+video", (MediaRef("image", "a.png"), MediaRef("video", "v.mp4")),
                   [("user", "<image>What phase?"), ("assistant", "Preparation."),
                    ("user", "And here? <video>"), ("assistant", "The action is clipping.")]),
            sample("text", (), [("user", "Name the instrument used for clipping."), ("assistant", "A clip applier.")]),
            sample("two-images", (MediaRef("image", "a.png"), MediaRef("image", "b.png")),
                   [("user", "<image><image>Same view?"), ("assistant", "No, the camera moved.")]),
            sample("video-clip", (MediaRef("video", "v.mp4", start_s=0.5, end_s=2.5),),
                   [("user", "<video>Describe."), ("assistant", "Dissection of the triangle of Calot.")]),
        ]
        _ENCODED[family] = [encoder.encode(s) for s in samples]
    return _ENCODED[family]


def build(family: str, attn: str = "sdpa", lora: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    fam = get_family(family)
    model = fam.build_model("tiny", seed=0, attn_implementation=attn, dtype=dtype)
    if lora:
        model = apply_lora(model, fam, LoraConfig(enabled=True, rank=2, dropout=0.0),
                           TrainConfig(seed=0, freeze_vision=True, freeze_projector=True))  # the recipe's LoRA default
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for name, param in model.named_parameters():
                if "lora_B" in name:  # zero at init: give the adapters a gradient path through A too
                    param.normal_(0.0, 0.05)
    return model.train()


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def unpacked_loss(model, samples: list[EncodedSample]) -> torch.Tensor:
    total = torch.zeros(())
    for sample in samples:
        inputs = dict(PadCollator(pad_token_id=0)([sample]).inputs)
        labels = inputs.pop("labels")
        total = total + token_loss_sum(model, inputs, labels)
    return total


def packed_inputs(model, samples: list[EncodedSample]) -> tuple[dict, torch.Tensor, list[int]]:
    inputs, seq_lens = pack_encoded(samples, pad_token_id=0)
    labels = inputs.pop("labels")
    inputs["position_ids"] = packed_position_ids(model, inputs, seq_lens)
    return inputs, labels, seq_lens


def assert_equivalent(reference, candidate, per_tensor: float = FP32_PER_TENSOR) -> tuple[float, float]:
    """Relative error of the loss and of the whole gradient <= TOLERANCE, of every parameter's gradient (norm of
    the difference / norm of the reference) <= per_tensor; returns (loss error, worst per-tensor error)."""
    (ref_loss, ref_grads), (loss, grads) = reference, candidate
    loss_error = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    assert loss_error <= TOLERANCE, f"loss {loss.item()} vs {ref_loss.item()} (relative error {loss_error:.2e})"
    assert grads.keys() == ref_grads.keys()
    worst = 0.0
    for name, ref in ref_grads.items():
        scale = ref.norm().item()
        error = (grads[name] - ref).norm().item() / scale if scale > 0 else grads[name].norm().item()
        assert error <= per_tensor, f"gradient of {name}: relative error {error:.2e}"
        worst = max(worst, error)
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    flat = torch.cat([grads[n].flatten() for n in ref_grads])
    total_error = ((flat - flat_ref).norm() / flat_ref.norm()).item()
    assert total_error <= TOLERANCE, f"whole gradient: relative error {total_error:.2e}"
    return loss_error, worst


# ---- the transformers contract --------------------------------------------------------------------------------


def capture_layer0(model, inputs) -> dict:
    """The keyword arguments transformers hands the first decoder layer (mask, text position ids)."""
    seen: dict = {}
    layer = unwrap_hf_model(model).model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen


def block_causal(seq_lens: list[int]) -> torch.Tensor:
    return torch.block_diag(*[torch.ones(n, n).tril() for n in seq_lens]).bool()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_builds_block_diagonal_mask_from_4_row_positions(family, attn, media_root):
    model = build(family, attn).eval()
    inputs, _, seq_lens = packed_inputs(model, encoded_mix(family, media_root))
    total = sum(seq_lens)
    assert inputs["position_ids"].shape == (4, 1, total) and "attention_mask" not in inputs

    seen = capture_layer0(model, inputs)
    mask = seen["attention_mask"]
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # eager: additive, 0 = attend
    assert torch.equal(allowed, block_causal(seq_lens))
    # flash_attention_2's input: the text row reaches the layers and splits the row exactly at the samples
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    text_row = seen["position_ids"]
    assert torch.equal(text_row, inputs["position_ids"][0])
    assert _is_packed_sequence(text_row, batch_size=1)
    (cu_seqlens, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(text_row)
    assert cu_seqlens.tolist() == np.cumsum([0] + seq_lens).tolist() and int(max_len) == max(seq_lens)

    # the 3 mRoPE rows alone: transformers sees no packing and builds one causal mask over the whole row
    seen = capture_layer0(model, {**inputs, "position_ids": inputs["position_ids"][1:]})
    mask = seen["attention_mask"]
    if mask is not None:  # sdpa returns None = is_causal over the whole row
        allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
        assert torch.equal(allowed, torch.ones(total, total).tril().bool())
    assert seen["position_ids"] is None
    assert not torch.equal(torch.ones(total, total).tril().bool(), block_causal(seq_lens))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_mrope_rows_are_the_models_own_per_sample(family, media_root):
    """Rows 1-3 equal what the model computes for each sample alone (compute_3d_position_ids, as forward does)."""
    model = build(family)
    samples = encoded_mix(family, media_root)
    inputs, _, seq_lens = packed_inputs(model, samples)
    position_ids = inputs["position_ids"]
    inner = unwrap_hf_model(model).model
    offset = 0
    for sample, length in zip(samples, seq_lens):
        single = {k: v for k, v in sample.vision.items() if k != "second_per_grid_ts" or family == "qwen2_5_vl"}
        expected = inner.compute_3d_position_ids(
            input_ids=sample.input_ids[None], inputs_embeds=torch.zeros(1, length, 1), attention_mask=None,
            cache=None, mm_token_type_ids=sample.mm_token_type_ids[None],
            image_grid_thw=single.get("image_grid_thw"), video_grid_thw=single.get("video_grid_thw"),
            **({"second_per_grid_ts": single["second_per_grid_ts"]} if "second_per_grid_ts" in single else {}))
        if expected is None:  # text only: the model's default, arange on all three rows
            expected = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
        assert torch.equal(position_ids[1:, :, offset:offset + length], expected), sample.id
        assert position_ids[0, 0, offset:offset + length].tolist() == list(range(length))
        offset += length
    if family == "qwen2_5_vl":  # the two clips have different real time steps
        assert len(set(inputs["second_per_grid_ts"].tolist())) == 2
    if family == "qwen3_vl":  # timestamps are text tokens inside the video spans
        assert "second_per_grid_ts" not in inputs


def test_pack_encoded_row_and_boundary_labels(media_root):
    samples = encoded_mix("qwen2_5_vl", media_root)
    inputs, seq_lens = pack_encoded(samples, pad_token_id=0)
    assert seq_lens == [s.input_ids.numel() for s in samples]
    assert "attention_mask" not in inputs and inputs["input_ids"].shape == (1, sum(seq_lens))
    assert torch.equal(inputs["input_ids"][0], torch.cat([s.input_ids for s in samples]))
    assert torch.equal(inputs["image_grid_thw"], torch.cat([s.vision["image_grid_thw"] for s in samples
                                                            if "image_grid_thw" in s.vision]))
    starts = np.cumsum([0] + seq_lens[:-1]).tolist()
    labels = inputs["labels"][0]
    assert all(labels[s] == IGNORE_INDEX for s in starts)
    # the supervised targets (label[p+1] for position p) are exactly the union of the samples' own targets
    targets = [(start + j, t) for start, s in zip(starts, samples)
               for j, t in enumerate(s.labels[1:].tolist()) if t != IGNORE_INDEX]
    packed_targets = [(p, t) for p, t in enumerate(labels[1:].tolist()) if t != IGNORE_INDEX]
    assert packed_targets == targets and targets
    assert all(samples[i].labels is not None and samples[i].labels.numel() == n for i, n in enumerate(seq_lens))


# ---- loss oracle ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_token_loss_sum_equals_transformers_loss(family, media_root):
    """Unpacked, padded batch of all four samples: our sum equals transformers' mean x supervised tokens."""
    model = build(family).eval()
    batch = PadCollator(pad_token_id=0)(encoded_mix(family, media_root))
    inputs = dict(batch.inputs)
    labels = inputs.pop("labels")
    with torch.no_grad():
        ours = token_loss_sum(model, inputs, labels)
        theirs = model(**inputs, labels=labels, use_cache=False).loss
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert supervised == batch.num_loss_tokens > 0
    assert ours.item() == pytest.approx(theirs.item() * supervised, rel=1e-6)


# ---- packed == unpacked ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_loss_and_gradients_equal_unpacked(family, lora, media_root):
    samples = encoded_mix(family, media_root)
    model = build(family, lora=lora)
    inputs, labels, _ = packed_inputs(model, samples)
    reference = loss_and_grads(model, lambda: unpacked_loss(model, samples))
    packed = loss_and_grads(model, lambda: token_loss_sum(model, inputs, labels))
    assert_equivalent(reference, packed)
    groups = {get_family(family).param_group(n) for n, g in packed[1].items() if g.abs().sum() > 0}
    assert groups == ({"language"} if lora else {"vision", "projector", "language"})
    if lora:
        assert any("lora_A" in n for n in packed[1]) and all("lora_" in n for n in packed[1])


@pytest.mark.parametrize("attn", ["eager", SDPA_VARLEN])
def test_packed_equals_unpacked_on_other_cpu_backends(attn, media_root):
    samples = encoded_mix("qwen2_5_vl", media_root)
    model = build("qwen2_5_vl", attn)
    inputs, labels, _ = packed_inputs(model, samples)
    reference = loss_and_grads(model, lambda: unpacked_loss(model, samples))
    assert_equivalent(reference, loss_and_grads(model, lambda: token_loss_sum(model, inputs, labels)))


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_positions_or_a_leaking_mask_fail_the_equivalence_check(family, media_root):
    """float64 (LoRA): the right inputs agree to 1e-9 in every tensor, each wrong one fails the 1e-5 check."""
    samples = encoded_mix(family, media_root)
    model = build(family, lora=True, dtype=torch.float64)
    inputs, labels, seq_lens = packed_inputs(model, samples)
    reference = loss_and_grads(model, lambda: unpacked_loss(model, samples))
    good = inputs["position_ids"]
    no_restart = good.clone()
    no_restart[0, 0] = torch.arange(sum(seq_lens))  # text row not restarting per sample
    wrong = {
        "text row not restarting": {**inputs, "position_ids": no_restart},
        "3-row mRoPE only": {**inputs, "position_ids": good[1:]},
        "mask over the whole row": {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])},
        "mRoPE of the concatenation": {**inputs, "position_ids": None},
    }
    for name, bad in wrong.items():
        with pytest.raises(AssertionError):
            assert_equivalent(reference, loss_and_grads(model, lambda: token_loss_sum(model, bad, labels)), TOLERANCE)
    # and the same check passes with the right inputs (the check itself is not what fails)
    _, worst = assert_equivalent(reference, loss_and_grads(model, lambda: token_loss_sum(model, inputs, labels)),
                                 TOLERANCE)
    assert worst <= 1e-9


# ---- backends -------------------------------------------------------------------------------------------------


def test_sdpa_varlen_matches_sdpa_with_block_diagonal_mask(media_root):
    samples = encoded_mix("qwen3_vl", media_root)
    masked, varlen = build("qwen3_vl", "sdpa").eval(), build("qwen3_vl", SDPA_VARLEN).eval()
    inputs, _, seq_lens = packed_inputs(masked, samples)
    assert capture_layer0(varlen, inputs)["attention_mask"] is None  # no T x T mask is built
    with torch.no_grad():
        reference = masked(**inputs, use_cache=False).logits
        ours = varlen(**inputs, use_cache=False).logits
        leaky = masked(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), use_cache=False).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky, reference, rtol=1e-3, atol=1e-3)
    assert packed_segments(inputs["position_ids"][0, 0]) == list(
        zip(np.cumsum([0] + seq_lens[:-1]).tolist(), np.cumsum(seq_lens).tolist()))


def test_sdpa_varlen_with_a_padding_mask_is_plain_sdpa(media_root):
    """Unpacked padded batches (eval, generation) go through transformers' sdpa unchanged."""
    batch = PadCollator(pad_token_id=0)(encoded_mix("qwen2_vl", media_root)[:2])
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
    with torch.no_grad():
        reference = build("qwen2_vl", "sdpa").eval()(**inputs, use_cache=False).logits
        ours = build("qwen2_vl", SDPA_VARLEN).eval()(**inputs, use_cache=False).logits
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], reference[keep], rtol=1e-5, atol=1e-5)


def test_attn_implementation_resolution_and_refusals(monkeypatch):
    assert ModelConfig(family="qwen2_vl", attn_implementation="auto").attn_implementation == "auto"
    assert ModelConfig(family="qwen2_vl").attn_implementation == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto", packing=True) == SDPA_VARLEN
    assert resolve_attn_implementation("auto", packing=False) == "sdpa"
    assert resolve_attn_implementation("eager", packing=True) == "eager"
    with pytest.raises(ConfigError, match="flash_attn"):
        resolve_attn_implementation("flash_attention_2", packing=True)
    for family in FAMILIES:  # transformers 5.25 refuses flex attention for all three classes
        with pytest.raises(ConfigError, match="flex"):
            resolve_attn_implementation("flex_attention", packing=True, model_class=get_family(family).model_class)


@pytest.mark.parametrize("attn", ["sdpa", "eager", SDPA_VARLEN])
def test_model_build_probe_accepts_confining_backends(attn):
    check_packing_confined(get_family("qwen2_vl").build_model("tiny", attn_implementation=attn))


def test_model_build_probe_refuses_a_leaking_backend(monkeypatch):
    """A transformers whose sdpa mask ignored the packed sequences (here: causal over the whole row), or a backend
    not known to confine, is a ConfigError at model build."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def whole_row_mask(*args, **kwargs):
        kwargs["mask_function"] = lambda b, h, q, kv: kv <= q
        return sdpa_mask(*args, **kwargs)

    model = get_family("qwen2_vl").build_model("tiny", attn_implementation="sdpa")
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "sdpa", whole_row_mask)
    with pytest.raises(ConfigError, match="block-diagonal"):
        check_packing_confined(model)
    monkeypatch.undo()
    check_packing_confined(model)
    AttentionInterface.register("test_unknown", sdpa_attention_forward)
    AttentionMaskInterface.register("test_unknown", sdpa_mask)
    model = get_family("qwen2_vl").build_model("tiny", attn_implementation="test_unknown")
    with pytest.raises(ConfigError, match="not known to confine"):
        check_packing_confined(model)


def test_packed_position_ids_unwraps_peft_and_ddp_like_wrappers(media_root):
    samples = encoded_mix("qwen2_5_vl", media_root)
    plain = build("qwen2_5_vl")
    inputs, seq_lens = pack_encoded(samples, pad_token_id=0)
    expected = packed_position_ids(plain, inputs, seq_lens)
    wrapped = build("qwen2_5_vl", lora=True)

    class Wrapper(torch.nn.Module):  # DDP / FSDP1 / DeepSpeedEngine keep the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert torch.equal(packed_position_ids(Wrapper(wrapped), inputs, seq_lens), expected)
    with pytest.raises(ValueError):
        packed_position_ids(plain, inputs, seq_lens[:-1])


# ---- GPU ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_2_packed_matches_per_sample_on_gpu(family, media_root):
    """flash_attention_2 (varlen from the text row) on a packed row = each sample alone; a 3-row position tensor
    (no text row) leaks. bf16, so a loose tolerance; the leak is far larger."""
    pytest.importorskip("flash_attn")
    samples = encoded_mix(family, media_root)
    model = get_family(family).build_model("tiny", seed=0, attn_implementation="flash_attention_2",
                                           dtype=torch.bfloat16).cuda().eval()
    inputs, _, seq_lens = packed_inputs(model, samples)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0].float()
        leaky = model(**{**inputs, "position_ids": inputs["position_ids"][1:]}, use_cache=False).logits[0].float()
        alone = []
        for sample in samples:
            single = {k: v.cuda() for k, v in PadCollator(pad_token_id=0)([sample]).inputs.items() if k != "labels"}
            single.pop("attention_mask")
            alone.append(model(**single, use_cache=False).logits[0].float())
    alone_TV = torch.cat(alone)
    assert (packed - alone_TV).abs().max() < 0.05
    assert (leaky - alone_TV).abs().max() > 0.1
