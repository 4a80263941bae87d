"""Joining the process group a launcher prepared, and the small collectives the loop needs.

torchrun and the sbatch script export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a
plain `surgsigma-train train` has none of them and runs as one process without a process group.
The group starts with a long timeout (model loading, first DeepSpeed op builds) and is switched to
a short one once training runs, so a dead peer ends the job (exit 76, requeue) instead of idling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from surgsigma_train.config.schema import DistributedConfig
from surgsigma_train.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists (even with one rank, e.g. DeepSpeed run alone under torchrun)."""
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """One collective for several scalars (float64 so token counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def set_timeout(self, seconds: float) -> None:
        if self.active:
            # No public API changes a live group's timeout; this private one is stable since torch 2.2.
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(timedelta(seconds=seconds))


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(cfg: DistributedConfig) -> DistEnv:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) or stay single-process."""
    cuda = torch.cuda.is_available()
    world = launched_world_size()
    if cfg.backend == "none":
        if world > 1:
            raise ConfigError(f"WORLD_SIZE={world} but distributed.backend is none: set distributed.backend "
                              "to ddp, deepspeed or fsdp2")
        return DistEnv(device=torch.device("cuda") if cuda else torch.device("cpu"))
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"distributed.backend={cfg.backend} needs a launcher (torchrun, srun via "
                          f"launch/): environment variables {missing} are not set")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.init_timeout_s),
                                device_id=device if cuda else None)
    return DistEnv(rank, local_rank, world, device)
