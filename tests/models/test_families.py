"""Family interface: registry, tiny configs, parameter groups, LoRA targets, seeded building."""

from __future__ import annotations

import pytest
import torch

from surgsigma_train.models import ModelFamily, get_family, known_families
from surgsigma_train.models.tokenizer import TOKENIZER_SPECS, load_qwen_tokenizer


@pytest.fixture(scope="module")
def tiny_models():
    return {name: get_family(name).build_model("tiny") for name in known_families()}


def test_registry():
    assert known_families() == ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    for name in known_families():
        family = get_family(name)
        assert isinstance(family, ModelFamily) and family.name == name
        assert name in TOKENIZER_SPECS
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl, qwen3_vl"):
        get_family("llava")


@pytest.mark.parametrize("name", known_families())
def test_tiny_config_is_consistent(name):
    family = get_family(name)
    config = family.tiny_config()
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    largest_id = max(load_qwen_tokenizer(name).get_vocab().values())
    assert text.vocab_size > largest_id and text.vocab_size % 128 == 0
    assert config.tie_word_embeddings
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)
    defaults = family.vision_defaults
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (
        defaults.patch_size,
        defaults.temporal_patch_size,
        defaults.merge_size,
    )
    if name == "qwen2_5_vl":
        assert all(0 <= index < vision.depth for index in vision.fullatt_block_indexes)
        assert len(vision.fullatt_block_indexes) < vision.depth  # some blocks use window attention
    if name == "qwen3_vl":
        indexes = vision.deepstack_visual_indexes
        assert all(0 <= index < vision.depth for index in indexes) and len(indexes) <= text.num_hidden_layers


@pytest.mark.parametrize("name", known_families())
def test_parameter_groups_partition_the_model(name, tiny_models):
    family = get_family(name)
    groups = {"vision": 0, "projector": 0, "language": 0}
    for parameter_name, parameter in tiny_models[name].named_parameters():
        groups[family.param_group(parameter_name)] += parameter.numel()  # raises if in none or several
    assert all(count > 0 for count in groups.values()), groups
    assert sum(groups.values()) == sum(p.numel() for p in tiny_models[name].parameters())


@pytest.mark.parametrize("name", known_families())
def test_parameter_group_names(name):
    family = get_family(name)
    assert family.param_group("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert family.param_group("model.visual.patch_embed.proj.weight") == "vision"
    assert family.param_group("model.visual.merger.mlp.0.weight") == "projector"
    assert family.param_group("model.language_model.layers.3.mlp.down_proj.weight") == "language"
    assert family.param_group("model.language_model.embed_tokens.weight") == "language"
    assert family.param_group("lm_head.weight") == "language"  # untied in the 7B checkpoints
    # names seen through wrappers (peft, DDP, torch.compile, FSDP1)
    assert family.param_group("base_model.model.model.visual.merger.ln_q.weight") == "projector"
    assert family.param_group("module._orig_mod.model.language_model.norm.weight") == "language"
    assert family.param_group("_fsdp_wrapped_module.model.visual.blocks.1.norm1.weight") == "vision"
    for bad in ("visual.blocks.0.weight", "model.visual.unknown.weight", "encoder.layer.0"):
        with pytest.raises(KeyError):
            family.param_group(bad)


def test_qwen3_extra_vision_modules():
    family = get_family("qwen3_vl")
    assert family.param_group("model.visual.pos_embed.weight") == "vision"
    assert family.param_group("model.visual.deepstack_merger_list.1.linear_fc2.bias") == "projector"


@pytest.mark.parametrize("name", known_families())
def test_lora_targets_only_the_language_model(name, tiny_models):
    peft = pytest.importorskip("peft")
    family = get_family(name)
    model = family.build_model("tiny")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_target_modules())
    wrapped = peft.get_peft_model(model, config)
    lora_names = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    layers = tiny_models[name].config.text_config.num_hidden_layers
    assert len(lora_names) == 2 * len(family.default_lora_targets) * layers  # A and B per linear per layer
    assert {family.param_group(n) for n in lora_names} == {"language"}
    # the plain suffix list would also adapt vision linears where names collide (Qwen2.5-VL's vision MLP)
    vision_linears = [
        n
        for n, module in tiny_models[name].named_modules()
        if isinstance(module, torch.nn.Linear)
        and n.split(".")[-1] in family.default_lora_targets
        and family.param_group(n + ".weight") != "language"
    ]
    assert bool(vision_linears) == (name == "qwen2_5_vl")


@pytest.mark.parametrize("name", known_families())
def test_tiny_build_is_seeded_and_leaves_global_rng_alone(name):
    family = get_family(name)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = family.build_model("tiny", seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = family.build_model("tiny", seed=7)
    other = family.build_model("tiny", seed=8)
    first_params, second_params, other_params = (dict(m.named_parameters()) for m in (first, second, other))
    assert all(torch.equal(first_params[k], second_params[k]) for k in first_params)
    assert not all(torch.equal(first_params[k], other_params[k]) for k in first_params)
    assert first.config._attn_implementation == "sdpa"
    assert next(first.parameters()).dtype == torch.float32
    assert family.build_model("tiny", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_stock_backend_needs_torchvision():
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    with pytest.raises(RuntimeError, match="torchvision"):
        get_family("qwen2_vl").build_processor(
            "tiny",
            image_min_pixels=1,
            image_max_pixels=2,
            video_min_pixels=1,
            video_max_pixels=2,
            vision_backend="stock",
        )
    with pytest.raises(ValueError, match="vision_backend"):
        get_family("qwen2_vl").build_processor(
            "tiny", image_min_pixels=1, image_max_pixels=2, video_min_pixels=1, video_max_pixels=2, vision_backend="pil"
        )


# Preprocessing configs as published with the checkpoints (Qwen2-VL: image config only, legacy min/max_pixels;
# Qwen3-VL: nested size, separate video config that asks for frame sampling).
PUBLISHED_CONFIGS = {
    "qwen2_vl": (
        {
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
        },
        None,
    ),
    "qwen3_vl": (
        {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "Qwen2VLImageProcessorFast",
            "processor_class": "Qwen3VLProcessor",
        },
        {
            "size": {"longest_edge": 25165824, "shortest_edge": 4096},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "fps": 2,
            "do_sample_frames": True,
            "video_processor_type": "Qwen3VLVideoProcessor",
            "processor_class": "Qwen3VLProcessor",
        },
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_local_checkpoint_directory_offline(name, tmp_path, monkeypatch):
    """A checkpoint directory laid out like the published ones builds model and processor without network."""
    import json

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family = get_family(name)
    original = family.build_model("tiny", seed=3)
    original.save_pretrained(tmp_path)
    load_qwen_tokenizer(name).save_pretrained(tmp_path)
    image_config, video_config = PUBLISHED_CONFIGS[name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_config))
    if video_config is not None:
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video_config))

    reloaded = family.build_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), reloaded.state_dict().values()))
    processor = family.build_processor(
        str(tmp_path), image_min_pixels=1024, image_max_pixels=65536, video_min_pixels=1024, video_max_pixels=65536
    )
    assert isinstance(processor, family.processor_class)
    assert processor.image_processor.patch_size == processor.video_processor.patch_size == image_config["patch_size"]
    assert tuple(processor.image_processor.image_mean) == tuple(image_config["image_mean"])
    assert processor.video_processor.size.longest_edge == 65536  # the run's bounds win over the checkpoint's
    assert not processor.video_processor.do_sample_frames  # we sample frames ourselves
    assert processor.chat_template == family.chat_template
