import math

import pytest

from surgsigma_train.config.schema import LoraConfig, TrainConfig
from surgsigma_train.models.registry import get_family
from surgsigma_train.training.params import (apply_freezing, apply_lora, build_optimizer, lr_multiplier,
                                             param_groups)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def family(request):
    return get_family(request.param)


def fresh(family):
    return family.build_model("tiny", seed=0)


def groups_of(model, family):
    return {n: family.param_group(n) for n, _ in model.named_parameters()}


def test_freezing_each_group_independently(family):
    for frozen in ("vision", "projector", "language"):
        model = fresh(family)
        apply_freezing(model, family, TrainConfig(**{f"freeze_{frozen}": True}))
        for name, p in model.named_parameters():
            assert p.requires_grad == (family.param_group(name) != frozen), name


def test_separate_learning_rates(family):
    model = fresh(family)
    train = TrainConfig(lr=1e-4, vision_lr=1e-5, projector_lr=5e-4, weight_decay=0.1, freeze_vision=False,
                        freeze_projector=False)
    groups = param_groups(model, family, train)
    by_group = {(g["group"], g["weight_decay"] > 0): g for g in groups}
    assert {g["group"] for g in groups} == {"vision", "projector", "language"}
    assert by_group[("vision", True)]["lr"] == 1e-5 and by_group[("projector", True)]["lr"] == 5e-4
    assert by_group[("language", True)]["lr"] == 1e-4
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert no_decay and all(p.ndim < 2 for p in no_decay if p.ndim < 2)
    build_optimizer(model, family, train)


def test_lora_stays_in_language_model(family):
    model = apply_lora(fresh(family), family, LoraConfig(enabled=True, rank=2),
                       TrainConfig(freeze_vision=True, freeze_projector=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".visual." not in n for n in lora)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= \
        {part for n in lora for part in n.split(".")}
    full = [n for n in trainable if "lora_" not in n]
    assert full and all("merger" in n for n in full)  # the projector is trained fully, the ViT frozen


def test_lora_rejects_unknown_targets(family):
    with pytest.raises(ValueError):
        apply_lora(fresh(family), family, LoraConfig(enabled=True, target_modules=["nonexistent_proj"]),
                   TrainConfig(freeze_vision=True, freeze_projector=True))


def test_schedule_shape():
    train = TrainConfig(max_steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, train) == pytest.approx(0.1)
    assert lr_multiplier(9, train) == pytest.approx(1.0)
    assert lr_multiplier(10, train) == pytest.approx(1.0)
    assert lr_multiplier(55, train) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, train) == pytest.approx(0.1)
    linear = TrainConfig(max_steps=10, lr_schedule="linear")
    assert lr_multiplier(5, linear) == pytest.approx(0.5)
    assert lr_multiplier(7, TrainConfig(max_steps=10, lr_schedule="constant")) == 1.0
    assert all(math.isfinite(lr_multiplier(s, train)) for s in range(200))


def test_lora_init_comes_from_the_train_seed(family):
    """Adapters are drawn from train.seed, whatever the global RNG went through before (a hub model is not
    seeded at all), and the global stream is left as it was."""
    import torch

    def adapters(seed: int, noise: int) -> dict:
        model = fresh(family)
        torch.manual_seed(noise)  # something else drew random numbers before LoRA
        before = torch.random.get_rng_state()
        model = apply_lora(model, family, LoraConfig(enabled=True, rank=2), TrainConfig(seed=seed))
        assert torch.equal(torch.random.get_rng_state(), before)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    a, b, c = adapters(0, noise=1), adapters(0, noise=2), adapters(1, noise=1)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
