"""One engine per backend: wrapping, backward, clip + step, and the backend's part of a checkpoint.

The loop (training/trainer.py) stays ours and calls, whatever the backend:

    with engine.accumulate(last_micro_batch):      # DDP no_sync / FSDP2 gradient sync / ZeRO boundary
        loss = token_loss_sum(engine.model, ...)
        engine.backward(loss / tokens_per_rank)
    grad_norm, applied = engine.step(max_grad_norm, skip)
    engine.save(folder) / engine.load(folder)       # weights + optimizer; the trainer adds the rest

Gradients are averaged over ranks by every backend, so the trainer scales each rank's loss sum by
world_size / global loss tokens: the step's gradient is then exactly the 1-process gradient of the
same global batch (token-weighted, not per-rank averaged).

Checkpoint layout per backend (inside `step-N/`, next to scheduler.pt, rng-rank{r}.pt, trainer_state.json):
    none, ddp  model/ or adapter/ (Hugging Face layout, rank 0), optimizer.pt (rank 0; replicated state)
    fsdp2      model/ or adapter/ from the full state dict gathered to rank 0, optimizer.pt = the full
               (unsharded, FQN-keyed) optimizer state gathered to rank 0 and scattered back on load;
               a checkpoint is therefore loadable with any backend and world size
    deepspeed  model/ or adapter/ (rank 0; ZeRO-3 gathers the parameters first) for eval and export,
               deepspeed/ = DeepSpeed's own save_checkpoint (every rank writes its optimizer partition)
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from surgsigma_train.config.schema import RecipeConfig
from surgsigma_train.distributed.env import DistEnv
from surgsigma_train.errors import ConfigError
from surgsigma_train.training import checkpoint as ckpt

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def _global_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    # FSDP2: the norm of sharded DTensor grads is a partial sum; full_tensor() all-reduces it.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class TorchEngine:
    """none / ddp / fsdp2: a torch optimizer over the (possibly wrapped or sharded) parameters."""

    def __init__(self, name: str, model: nn.Module, unwrapped: nn.Module, optimizer: torch.optim.Optimizer,
                 env: DistEnv):
        self.name, self.model, self.unwrapped, self.optimizer, self.env = name, model, unwrapped, optimizer, env
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def accumulate(self, last: bool) -> ContextManager:
        if self.name == "ddp" and not last:
            return self.model.no_sync()  # gradients all-reduced once, on the step's last micro-batch
        if self.name == "fsdp2":
            self.model.set_requires_gradient_sync(last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float | None, skip: bool) -> tuple[float, bool]:
        """Clip and step unless `skip` (agreed by all ranks) or the global gradient norm is non-finite.

        The norm is the same number on every rank (DDP gradients are already all-reduced; FSDP2 reduces
        the shards' norms), so ranks always take the same decision without another collective."""
        norm = _global_norm(self.trainable)
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.trainable, max_norm, norm)
        grad_norm = float(norm)
        applied = not skip and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    # ------------------------------------------------------------ checkpoint
    def save(self, folder: Path) -> None:
        if self.name == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            # collectives: every rank takes part, rank 0 receives the full tensors on the CPU
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.model, options=opts)
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
            if self.env.is_main:
                ckpt.save_weights(self.unwrapped, folder, weights)
                torch.save(optim, folder / "optimizer.pt")
            return
        if self.env.is_main:
            ckpt.save_weights(self.unwrapped, folder)
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        """Optimizer state (weights were loaded when the model was built from `folder`)."""
        if self.name == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            full = torch.load(folder / "optimizer.pt", weights_only=True) if self.env.is_main else {}
            set_optimizer_state_dict(self.model, self.optimizer, full,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            return
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))

    def sharding(self) -> dict[str, Any]:
        """Parameter and optimizer-state elements held by this rank vs the whole model (tests assert it)."""
        def local(t: torch.Tensor) -> int:
            return t.to_local().numel() if hasattr(t, "to_local") else t.numel()

        state = [v for s in self.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.ndim > 0]
        return {"params_local": sum(local(p) for p in self.model.parameters()),
                "params_global": sum(p.numel() for p in self.model.parameters()),
                "optim_state_local": sum(local(v) for v in state),
                "optim_state_global": sum(v.numel() for v in state)}


class DeepSpeedEngineAdapter:
    """DeepSpeed ZeRO-2/3 behind the same interface; our optimizer and LR schedule stay the client's."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], env: DistEnv):
        import deepspeed

        self.env, self.unwrapped, self.optimizer, self.config = env, model, optimizer, config
        self.zero_stage = config["zero_optimization"]["stage"]
        self.model, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                   dist_init_required=False)

    def accumulate(self, last: bool) -> ContextManager:
        # Our loop calls step() once per optimizer step; DeepSpeed reduces gradients on the boundary.
        self.model.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the trainer already token-weights the loss

    def step(self, max_norm: float | None, skip: bool) -> tuple[float, bool]:
        """DeepSpeed takes the decision inside its step, collectively and before updating: it computes the
        global gradient norm (all-reduced) and drops the step and its gradients when it is non-finite.
        A non-finite loss on any rank (what `skip` reports) always makes that norm non-finite."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        applied = bool(self.model.was_step_applied())
        if skip and applied:
            raise RuntimeError("DeepSpeed applied a step whose loss was non-finite on some rank")
        return (float("nan") if norm is None else float(norm)), applied

    def _full_weights(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage == 3:  # collective: parameters gathered to rank 0
            return self.model._zero3_consolidated_16bit_state_dict()
        return None

    def save(self, folder: Path) -> None:
        weights = self._full_weights()
        if self.env.is_main:
            ckpt.save_weights(self.unwrapped, folder, weights)
        self.model.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False,
                                   exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        path, _ = self.model.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"{folder / 'deepspeed'}: no DeepSpeed state to resume from")

    def sharding(self) -> dict[str, Any]:
        opt = self.model.optimizer
        if self.zero_stage == 3:
            params = [p for p in self.model.module.parameters()]
            local_params = sum(p.ds_tensor.numel() for p in params)
            global_params = sum(p.ds_numel for p in params)
            optim_local = sum(t.numel() for t in opt.fp32_partitioned_groups_flat)
        else:
            local_params = global_params = sum(p.numel() for p in self.model.module.parameters())
            optim_local = sum(t.numel() for t in opt.single_partition_of_fp32_groups)
        optim_global = sum(p.numel() for p in self.model.module.parameters() if p.requires_grad) if \
            self.zero_stage == 2 else sum(p.ds_numel for p in self.model.module.parameters() if p.requires_grad)
        return {"params_local": local_params, "params_global": global_params,
                "optim_state_local": optim_local, "optim_state_global": optim_global, "zero_stage": self.zero_stage}


Engine = TorchEngine | DeepSpeedEngineAdapter


def deepspeed_config(cfg: RecipeConfig, env: DistEnv) -> dict[str, Any]:
    """The DeepSpeed JSON (recipe path or configs/deepspeed/zero{2,3}[_offload].json), "auto" values filled."""
    d, t = cfg.distributed, cfg.train
    if d.deepspeed_config:
        path = Path(d.deepspeed_config)
    else:
        offload = "_offload" if d.offload_optimizer or d.offload_params else ""
        path = REPO_CONFIGS / f"zero{d.zero_stage}{offload}.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"distributed.deepspeed_config {path}: {exc}") from exc
    auto = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * env.world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key != "gradient_clipping" and config[key] != value:
            raise ConfigError(f"{path}: {key}={config[key]} contradicts the recipe ({value}); use \"auto\"")
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = d.zero_stage
    if not d.offload_optimizer:
        zero.pop("offload_optimizer", None)
    if not d.offload_params:
        zero.pop("offload_param", None)
    config["steps_per_print"] = 10**9  # our telemetry logs; DeepSpeed's own prints would interleave
    return config


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    # The language model's decoder layers are the FSDP2 units. The vision tower stays in the root unit:
    # its parameters are gathered once per forward whatever the rank's images/videos, so ranks whose
    # micro-batches call the vision tower a different number of times still issue the same collectives.
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def build_engine(cfg: RecipeConfig, model: nn.Module, make_optimizer: OptimizerFactory, env: DistEnv) -> Engine:
    backend = cfg.distributed.backend
    model = model.to(env.device)
    if backend == "none":
        return TorchEngine("none", model, model, make_optimizer(model), env)
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters: a rank whose micro-batch has no image/video leaves the vision tower
        # without gradients; DDP then marks them ready instead of waiting forever.
        wrapped = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                      find_unused_parameters=True)
        return TorchEngine("ddp", wrapped, model, make_optimizer(model), env)
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        layers = _decoder_layers(model)
        if not layers:
            raise ConfigError(f"fsdp2: no *DecoderLayer modules found in {type(model).__name__}")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return TorchEngine("fsdp2", model, model, make_optimizer(model), env)
    if backend == "deepspeed":
        optimizer = make_optimizer(model)
        if cfg.distributed.offload_optimizer:  # the step runs on the CPU: DeepSpeed's vectorised Adam (JIT-built)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            t = cfg.train
            optimizer = DeepSpeedCPUAdam(optimizer.param_groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                                         adamw_mode=True)
        return DeepSpeedEngineAdapter(model, optimizer, deepspeed_config(cfg, env), env)
    raise ConfigError(f"distributed.backend {backend!r} is not known")

