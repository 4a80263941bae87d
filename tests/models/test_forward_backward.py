"""Tiny random models train on processor output: finite loss, gradients in every parameter group."""

from __future__ import annotations

import copy

import pytest
import torch

from surgsigma_train.models import get_family, known_families


def model_inputs(processor, conversation, media) -> dict:
    image_HWC, frames_THWC, metadata = media
    text = processor.apply_chat_template(conversation, tokenize=False)
    batch = processor(
        text=[text],
        images=[image_HWC],
        videos=[frames_THWC],
        video_metadata=[copy.deepcopy(metadata)],
        return_tensors="pt",
    )
    batch = dict(batch)
    labels = batch["input_ids"].clone()
    labels[batch["mm_token_type_ids"] != 0] = -100  # no loss on media placeholders
    batch["labels"] = labels
    return batch


@pytest.mark.parametrize("family", known_families())
def test_forward_backward_finite(family, processor_for, conversation, media):
    model_family = get_family(family)
    model = model_family.build_model("tiny", seed=0)
    model.train()
    batch = model_inputs(processor_for(family), conversation, media)
    if family == "qwen2_5_vl":
        assert "second_per_grid_ts" in batch
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss)
    # random init over a 151680-way vocabulary: loss close to log(vocab)
    assert abs(outputs.loss.item() - torch.log(torch.tensor(151680.0)).item()) < 1.0
    outputs.loss.backward()

    grad_norms = {"vision": 0.0, "projector": 0.0, "language": 0.0}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name
            grad_norms[model_family.param_group(name)] += parameter.grad.float().norm().item()
    assert all(norm > 0 for norm in grad_norms.values()), grad_norms


@pytest.mark.integration
@pytest.mark.parametrize("family", known_families())
def test_media_change_the_logits(family, processor_for, conversation, media):
    """The visual features reach the LM (a broken placeholder/feature match would raise or be ignored)."""
    model = get_family(family).build_model("tiny", seed=0).eval()
    batch = model_inputs(processor_for(family), conversation, media)
    with torch.no_grad():
        reference = model(**batch).logits
        batch["pixel_values"] = batch["pixel_values"].flip(0)
        changed = model(**batch).logits
    text_positions = batch["mm_token_type_ids"][0] == 0
    assert not torch.allclose(reference[0, text_positions], changed[0, text_positions])
