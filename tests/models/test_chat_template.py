"""Our chat templates: exact Qwen-VL strings, prefix consistency, generation prompt."""

from __future__ import annotations

import itertools

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from surgsigma_train.models import get_family, known_families

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"

CONVERSATIONS = {
    "text_only": [
        {"role": "user", "content": "Which phase is this?"},
        {"role": "assistant", "content": "Calot triangle dissection."},
    ],
    "multimodal_multiturn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What instrument is visible?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A grasper."}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And now?\nExplain."}]},
        {"role": "assistant", "content": "Clipping of the cystic artery."},
    ],
    "own_system": [
        {"role": "system", "content": "You are a surgical assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": ""},
    ],
}


def render(family: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=get_family(family).chat_template,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_exact_strings(family):
    assert render(family, CONVERSATIONS["text_only"]) == (
        DEFAULT_SYSTEM
        + "<|im_start|>user\nWhich phase is this?<|im_end|>\n"
        + "<|im_start|>assistant\nCalot triangle dissection.<|im_end|>\n"
    )
    assert render(family, CONVERSATIONS["multimodal_multiturn"]) == (
        DEFAULT_SYSTEM
        + f"<|im_start|>user\n{IMAGE}What instrument is visible?<|im_end|>\n"
        + "<|im_start|>assistant\nA grasper.<|im_end|>\n"
        + f"<|im_start|>user\n{VIDEO}And now?\nExplain.<|im_end|>\n"
        + "<|im_start|>assistant\nClipping of the cystic artery.<|im_end|>\n"
    )
    # a conversation's own system message replaces the default one
    assert render(family, CONVERSATIONS["own_system"]) == (
        "<|im_start|>system\nYou are a surgical assistant.<|im_end|>\n"
        + f"<|im_start|>user\nHi{IMAGE}{IMAGE}<|im_end|>\n"
        + "<|im_start|>assistant\n<|im_end|>\n"
    )


def test_qwen3_has_no_default_system():
    assert render("qwen3_vl", CONVERSATIONS["text_only"]) == (
        "<|im_start|>user\nWhich phase is this?<|im_end|>\n"
        + "<|im_start|>assistant\nCalot triangle dissection.<|im_end|>\n"
    )
    assert render("qwen3_vl", CONVERSATIONS["own_system"]).startswith(
        "<|im_start|>system\nYou are a surgical assistant.<|im_end|>\n<|im_start|>user\nHi"
    )


@pytest.mark.parametrize("family", known_families())
def test_generation_prompt(family):
    messages = CONVERSATIONS["text_only"][:1]
    without = render(family, messages)
    assert render(family, messages, add_generation_prompt=True) == without + "<|im_start|>assistant\n"
    assert render(family, [], add_generation_prompt=True) == "<|im_start|>assistant\n"


@pytest.mark.parametrize(("family", "name"), list(itertools.product(known_families(), CONVERSATIONS)))
def test_prefix_consistency(family, name):
    """Rendering messages[:k] is a prefix of rendering messages[:k+1] (the data layer's loss mask needs it)."""
    messages = CONVERSATIONS[name]
    renders = [render(family, messages[:k]) for k in range(len(messages) + 1)]
    assert renders[0] == ""
    for shorter, longer in itertools.pairwise(renders):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    # the generation prompt is exactly the start of the next assistant turn
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            assert renders[k + 1].startswith(render(family, messages[:k], add_generation_prompt=True))


@pytest.mark.parametrize("family", known_families())
def test_unknown_part_type_is_an_error(family):
    with pytest.raises(Exception, match="Unsupported content part type: audio"):
        render(family, [{"role": "user", "content": [{"type": "audio"}]}])


@pytest.mark.parametrize("family", known_families())
def test_tokenizer_and_processor_carry_the_template(family):
    model_family = get_family(family)
    tokenizer = model_family.build_tokenizer("tiny")
    assert tokenizer.chat_template == model_family.chat_template
    text = tokenizer.apply_chat_template(CONVERSATIONS["multimodal_multiturn"], tokenize=False)
    assert text == render(family, CONVERSATIONS["multimodal_multiturn"])
