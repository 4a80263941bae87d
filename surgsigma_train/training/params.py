"""What is trained and how fast: freezing, LoRA/DoRA, parameter groups, AdamW and the LR schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from surgsigma_train.config.schema import LoraConfig, TrainConfig
from surgsigma_train.models.family import ModelFamily

GROUPS = ("vision", "projector", "language")


def apply_freezing(model: nn.Module, family: ModelFamily, train: TrainConfig) -> None:
    frozen = {"vision": train.freeze_vision, "projector": train.freeze_projector, "language": train.freeze_language}
    for name, param in model.named_parameters():
        if frozen[family.param_group(name)]:
            param.requires_grad_(False)


def apply_lora(model: nn.Module, family: ModelFamily, lora: LoraConfig, train: TrainConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # Modules of the vision tower / projector the user keeps trainable (freeze_* false) are trained
    # fully next to the adapters; everything else is frozen by peft.
    keep = [g for g in ("vision", "projector") if not getattr(train, f"freeze_{g}")]
    prefixes = [p.rstrip(".") for g in keep for p in (family.vision_tower_prefixes if g == "vision"
                                                      else family.projector_prefixes)]
    trainable_full = [n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)]
    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.dora,
        target_modules=family.lora_target_modules(lora.target_modules), bias="none",
    )
    # peft draws the adapters' initial A matrices from the global RNG: seed it here, so a run's adapters do not
    # depend on whatever drew random numbers before (a hub model is not seeded at all), and leave the global
    # stream as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        peft_model = get_peft_model(model, config)
    if not any("lora_" in n for n, _ in peft_model.named_parameters()):
        raise ValueError(f"LoRA matched no module for targets {lora.target_modules or family.default_lora_targets}")
    wanted = {"base_model.model." + n for n in trainable_full}
    for name, param in peft_model.named_parameters():
        if name in wanted:
            param.requires_grad_(True)
    return peft_model


def param_groups(model: nn.Module, family: ModelFamily, train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups by (vision/projector/language) x (decay/no decay); biases and norms get no decay."""
    lrs = {"vision": train.vision_lr or train.lr, "projector": train.projector_lr or train.lr, "language": train.lr}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and "norm" not in name.lower()
        buckets.setdefault((family.param_group(name), decay), []).append(param)
    return [
        {"params": params, "lr": lrs[group], "weight_decay": train.weight_decay if decay else 0.0,
         "group": group}
        for (group, decay), params in sorted(buckets.items())
    ]


def build_optimizer(model: nn.Module, family: ModelFamily, train: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, family, train)
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, eps=train.adam_eps)


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine/linear decay to min_lr_ratio at max_steps (or constant)."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if train.lr_schedule == "cosine" else 1 - progress
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, train))


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
