"""Atomic checkpoints: `step-N.tmp/` is written, a COMMITTED marker goes in last, then it is renamed.

A folder without the marker (a save killed halfway) is never loaded and is cleaned up. Weights are
saved in the Hugging Face layout (`model/` for full fine-tuning, `adapter/` for LoRA), so a
checkpoint is also what `eval` and export load whatever the backend; optimizer, scheduler and RNG
states (one file per rank) are plain tensors loaded with `weights_only=True`. What each distributed
backend adds is described in surgsigma_train/distributed/engines.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from surgsigma_train.errors import ConfigError

COMMIT_MARKER = "COMMITTED"
TRAIN_VIDEOS = "train_videos.json"  # the source videos a checkpoint was trained on (eval's leakage guard)
_STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": list(random.getstate()[1]),
        "python_meta": [random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss = state["python_meta"]
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def committed_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / COMMIT_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def clean_uncommitted(checkpoint_dir: Path) -> list[Path]:
    """Remove folders left by saves that never committed; returns what was removed."""
    removed = []
    if checkpoint_dir.is_dir():
        for child in checkpoint_dir.iterdir():
            if child.is_dir() and not (child / COMMIT_MARKER).is_file():
                shutil.rmtree(child)
                removed.append(child)
    return removed


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = committed_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def save_checkpoint(checkpoint_dir: Path, step: int, write: Callable[[Path], None], *, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None, keep_last: int = 2) -> Path:
    """The commit protocol; `write(tmp)` runs on every rank and writes that rank's share.

    rank 0 makes `step-N.tmp/`; all ranks write; after a barrier rank 0 writes the COMMITTED marker
    last, renames the folder to `step-N/` and prunes to the newest `keep_last`; a final barrier keeps
    any rank from reading the folder before it is committed.
    """
    final = checkpoint_dir / f"step-{step}"
    tmp = checkpoint_dir / f"step-{step}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if rank == 0:
        marker = tmp / COMMIT_MARKER
        with marker.open("w") as fh:
            fh.write(f"step {step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # an older run's step-N: replaced only now, once the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoint_dir)
        for old in committed_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def save_weights(model: torch.nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Hugging Face layout: `model/` (full fine-tuning) or `adapter/` (LoRA) plus kept-trainable base
    parameters; `state_dict` is the gathered full state of a sharded model (FSDP2, ZeRO-3)."""
    is_peft = hasattr(model, "peft_config")
    target = folder / ("adapter" if is_peft else "model")
    model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)
    if is_peft:
        save_base_trainables(model, target, state_dict)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


BASE_TRAINABLES = "base_trainables.safetensors"


def save_base_trainables(model: torch.nn.Module, adapter_dir: Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """With LoRA, base parameters the user kept trainable (e.g. the projector) are not in the adapter
    file peft writes; they are saved next to it so resume and eval get them back."""
    from safetensors.torch import save_file

    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    values = state_dict if state_dict is not None else dict(model.named_parameters())
    extra = {n: values[n].detach().cpu().contiguous() for n in names}
    if extra:
        save_file(extra, str(adapter_dir / BASE_TRAINABLES))


def load_base_trainables(model: torch.nn.Module, adapter_dir: Path) -> int:
    from safetensors.torch import load_file

    path = adapter_dir / BASE_TRAINABLES
    if not path.is_file():
        return 0
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in saved if n not in params]
    if missing:
        raise KeyError(f"{path}: parameters not in the model: {missing[:5]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    return len(saved)


def load_trainer_state(path: Path, rank: int = 0) -> dict[str, Any]:
    """RNGs of this rank and the trainer state of a committed checkpoint (optimizer: the engine's job)."""
    if not (path / COMMIT_MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a committed checkpoint (no {COMMIT_MARKER} marker)")
    set_rng_state(torch.load(path / rng_file(rank), weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


def weights_dir(path: Path) -> tuple[str, Path]:
    """("adapter" | "model", folder) of a checkpoint's weights."""
    for kind in ("adapter", "model"):
        if (path / kind).is_dir():
            return kind, path / kind
    raise ConfigError(f"{path} holds neither model/ nor adapter/ weights: not a checkpoint of this trainer")


# What a checkpoint's weights are tied to: another value builds a model its weights and optimizer state do not fit.
MODEL_KEYS = ("model.family", "model.source", "lora.enabled", "train.freeze_vision", "train.freeze_projector",
              "train.freeze_language")
LORA_SHAPE_KEYS = ("lora.rank", "lora.alpha", "lora.target_modules", "lora.dora")


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _same(key: str, saved: Any, now: Any) -> bool:
    if key == "model.source" and isinstance(saved, str) and isinstance(now, str) and saved != now:
        return Path(saved).exists() and Path(now).exists() and Path(saved).resolve() == Path(now).resolve()
    if key == "lora.alpha" and saved is not None and now is not None:
        return float(saved) == float(now)
    return saved == now


def model_changes(saved_recipe: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every model-defining key that differs between two resolved recipes."""
    keys = list(MODEL_KEYS)
    if _lookup(saved_recipe, "lora.enabled") and _lookup(current, "lora.enabled"):
        keys += LORA_SHAPE_KEYS
        keys.remove("train.freeze_language")  # with LoRA the base language model is frozen either way
    return [(k, _lookup(saved_recipe, k), _lookup(current, k)) for k in keys
            if not _same(k, _lookup(saved_recipe, k), _lookup(current, k))]


def check_same_model(checkpoint: Path, cfg: Any, kind: str | None = None) -> None:
    """Refuse (exit 2) to resume a checkpoint into a different model: the key, both values, what to do."""
    import yaml

    kind = kind or weights_dir(checkpoint)[0]
    try:
        saved = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if isinstance(saved, dict):
        changes = model_changes(saved, cfg.model_dump(mode="json"))
    else:  # no recipe saved with it: at least the kind of weights must fit
        changes = [("lora.enabled", kind == "adapter", cfg.lora.enabled)] if (kind == "adapter") != cfg.lora.enabled else []
    if changes:
        listed = "; ".join(f"{k}: {saved_v!r} in the checkpoint, {now!r} now" for k, saved_v, now in changes)
        raise ConfigError(
            f"cannot resume from {checkpoint}: the model changed ({listed}). Its weights and optimizer state only "
            f"fit the model they were trained as. Set {', '.join(k for k, _, _ in changes)} back, or start a fresh "
            "run (train.resume=never, or another output.dir).")
