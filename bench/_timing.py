"""Throughput measurement shared by both sides of bench/data_pipeline.py (our venv and LLaMA-Factory's).

Imports nothing but torch and the standard library, so that the LLaMA-Factory environment can use it
unchanged: both sides are timed by the same code.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def loader_kwargs(num_workers: int) -> dict[str, Any]:
    """DataLoader options used for every pipeline (ours, LLaMA-Factory's, the decode floor).

    The same as surgsigma_train.data.loader.build_loader: fork workers, prefetch_factor 2, no persistent
    workers, no pinning (CPU).
    """
    kwargs: dict[str, Any] = {"num_workers": num_workers}
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=2)
    return kwargs


def measure_loader(loader: torch.utils.data.DataLoader, num_batches: int, warmup_batches: int,
                   count: Callable[[Any], int]) -> dict[str, float]:
    """Steady-state throughput of a DataLoader.

    The clock starts when the `warmup_batches`-th batch has arrived (worker start-up, imports and
    first-call caches are excluded alike for every pipeline) and stops at the last one.
    `count(batch)` returns the number of samples in a batch. Returns samples, seconds, samples_per_s.
    """
    samples = 0
    start = None
    first = time.perf_counter()
    for i, batch in enumerate(loader):
        if i == warmup_batches - 1:
            start = time.perf_counter()
            continue
        if start is None:
            continue
        samples += count(batch)
        if i >= warmup_batches + num_batches - 1:
            break
    end = time.perf_counter()
    if start is None or samples == 0:
        raise RuntimeError("the loader delivered too few batches to measure")
    return {"samples": samples, "seconds": end - start, "samples_per_s": samples / (end - start),
            "startup_s": start - first}
