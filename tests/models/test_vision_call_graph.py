"""The zero-weight dummy vision pass (models/vision_call_graph.py), one process, every family: the tower is called
once per media slot whatever the micro-batch holds, the loss is bit-identical, the gradients are bit-identical
except that vision parameters without a real gradient get an exact zero one (all of them, DeepStack mergers
included). The multi-process consequences (no hang, 1-process losses) are in tests/distributed/."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from surgsigma_train.models import get_family, known_families
from surgsigma_train.models.vision_call_graph import VisionCallGraph, dummy_vision_inputs, media_slots
from surgsigma_train.training.trainer import token_loss_sum

SLOTS = ("image", "video")


def batch_for(processor, *, image: bool, video: bool, media) -> tuple[dict, torch.Tensor]:
    image_HWC, frames_THWC, metadata = media
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": "What happens here?"}] + \
        ([{"type": "video"}] if video else [])
    conversation = [{"role": "user", "content": content},
                    {"role": "assistant", "content": "The grasper retracts the gallbladder."}]
    kwargs = {}
    if image:
        kwargs["images"] = [image_HWC]
    if video:
        kwargs["videos"], kwargs["video_metadata"] = [frames_THWC], [copy.deepcopy(metadata)]
    inputs = dict(processor(text=[processor.apply_chat_template(conversation, tokenize=False)], return_tensors="pt",
                            **kwargs))
    labels = inputs["input_ids"].clone()
    labels[inputs["mm_token_type_ids"] != 0] = -100
    return inputs, labels


def loss_and_grads(model, inputs, labels, vision) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, inputs, labels, vision)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def count_tower_calls(tower: torch.nn.Module) -> list[int]:
    calls = [0]

    def count(*_):
        calls[0] += 1
    tower.register_forward_pre_hook(count)
    return calls


@pytest.mark.parametrize("family", known_families())
@pytest.mark.parametrize("image,video", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["text", "image", "video", "image+video"])
def test_dummy_pass_is_bit_identical_and_calls_the_tower_once_per_slot(family, image, video, processor_for, media):
    model_family = get_family(family)
    model = model_family.build_model("tiny", seed=0).train()
    inputs, labels = batch_for(processor_for(family), image=image, video=video, media=media)
    vision = VisionCallGraph(model, model_family, SLOTS)
    calls = count_tower_calls(vision.tower)

    plain_loss, plain_grads = loss_and_grads(model, inputs, labels, None)
    assert calls[0] == image + video  # the stock forward skips the tower for a missing media kind
    calls[0] = 0
    loss, grads = loss_and_grads(model, inputs, labels, vision)
    assert calls[0] == len(SLOTS)  # the same on every rank, whatever the micro-batch holds

    assert torch.equal(loss, plain_loss) and torch.isfinite(loss)  # bit for bit
    touched = 0
    for name, grad in grads.items():
        plain = plain_grads[name]
        group = model_family.param_group(name)
        assert grad is not None or group == "language", f"{name}: no gradient from the dummy pass"
        if plain is None:  # reached only by the dummy: an exact zero
            assert group != "language" and not image and not video, name
            assert torch.count_nonzero(grad) == 0, name
            touched += 1
        else:
            assert torch.equal(grad, plain), name  # a real gradient + exact zeros from the dummy
    vision_params = sum(model_family.param_group(n) != "language" for n in grads)
    assert touched == (vision_params if not (image or video) else 0)


def test_deepstack_mergers_need_their_outputs_touched(processor_for, media):
    """Qwen3-VL: with only the merged tokens touched, the DeepStack mergers would get no gradient on a text-only
    rank (DDP/FSDP2/ZeRO would reduce different parameter sets); the family lists their outputs."""
    family = get_family("qwen3_vl")
    assert "deepstack_features" in family.vision_outputs
    model = family.build_model("tiny", seed=0).train()
    inputs, labels = batch_for(processor_for("qwen3_vl"), image=False, video=False, media=media)
    merged_only = dataclasses.replace(family, vision_outputs=("pooler_output",))
    _, grads = loss_and_grads(model, inputs, labels, VisionCallGraph(model, merged_only, SLOTS))
    untouched = sorted({n.split(".")[2] for n, g in grads.items() if g is None and family.param_group(n) != "language"})
    assert untouched == ["deepstack_merger_list"]
    _, grads = loss_and_grads(model, inputs, labels, VisionCallGraph(model, family, SLOTS))
    assert all(g is not None for n, g in grads.items() if family.param_group(n) != "language")


@pytest.mark.parametrize("family", known_families())
def test_dummy_inputs_come_from_the_vision_config(family):
    config = get_family(family).tiny_config().vision_config
    pixels, grid = dummy_vision_inputs(config)
    m, p, t, c = config.spatial_merge_size, config.patch_size, config.temporal_patch_size, config.in_channels
    assert grid.tolist() == [[1, 2 * m, 2 * m]] and pixels.shape == (4 * m * m, c * t * p * p)
    other = copy.deepcopy(config)
    other.patch_size, other.spatial_merge_size, other.in_channels = 7, 3, 1
    pixels, grid = dummy_vision_inputs(other)
    assert grid.tolist() == [[1, 6, 6]] and pixels.shape == (36, 1 * t * 7 * 7)


def test_frozen_tower_still_runs_the_dummy_forward(processor_for, media):
    """freeze_vision (+ projector): ZeRO-3 gathers frozen parameters for a forward too, so the dummy still calls
    the tower; nothing in it needs a gradient, so it adds no backward, as a real frozen tower adds none."""
    family = get_family("qwen2_5_vl")
    model = family.build_model("tiny", seed=0).train()
    for name, param in model.named_parameters():
        param.requires_grad_(family.param_group(name) == "language")
    inputs, labels = batch_for(processor_for("qwen2_5_vl"), image=False, video=False, media=media)
    vision = VisionCallGraph(model, family, SLOTS)
    calls = count_tower_calls(vision.tower)
    plain_loss, plain_grads = loss_and_grads(model, inputs, labels, None)
    loss, grads = loss_and_grads(model, inputs, labels, vision)
    assert calls[0] == 2 and torch.equal(loss, plain_loss)
    assert all((g is None) == (plain_grads[n] is None) and (g is None or torch.equal(g, plain_grads[n]))
               for n, g in grads.items())


def test_lora_model(processor_for, media):
    """PEFT-wrapped model (the tower found through get_base_model), vision and projector kept trainable."""
    from surgsigma_train.config.schema import LoraConfig, TrainConfig
    from surgsigma_train.training.params import apply_lora

    family = get_family("qwen2_vl")
    train = TrainConfig(freeze_vision=False, freeze_projector=False)
    model = apply_lora(family.build_model("tiny", seed=0), family, LoraConfig(enabled=True, rank=4, alpha=8), train)
    model.train()
    inputs, labels = batch_for(processor_for("qwen2_vl"), image=False, video=True, media=media)
    vision = VisionCallGraph(model, family, SLOTS)
    calls = count_tower_calls(vision.tower)
    plain_loss, plain_grads = loss_and_grads(model, inputs, labels, None)
    loss, grads = loss_and_grads(model, inputs, labels, vision)
    assert calls[0] == 1 + 2 and torch.equal(loss, plain_loss)
    assert any("lora_" in n and g is not None for n, g in grads.items())
    assert all(g is None or torch.equal(g, plain_grads[n]) for n, g in grads.items())


def test_media_slots_and_no_slots():
    from surgsigma_train.data.sample import MediaRef, Message, Sample

    def sample(*kinds):
        return Sample("s", (Message("user", "q"),), tuple(MediaRef(k, f"x.{k}") for k in kinds))

    assert media_slots([sample("video"), sample(), sample("image", "image")]) == ("image", "video")
    assert media_slots([sample("video"), sample()]) == ("video",)
    assert media_slots([sample()]) == ()
    family = get_family("qwen2_vl")
    model = family.build_model("tiny", seed=0)
    assert VisionCallGraph(model, family, ()).missing({"input_ids": torch.ones(1, 2)}) == []
    with pytest.raises(ValueError):
        VisionCallGraph(model, family, ("audio",))
