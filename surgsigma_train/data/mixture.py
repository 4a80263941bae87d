"""Weighted data mixtures: per-task, per-source and per-specialty sampling weights, re-drawn every epoch.

A sample's weight is the product of its task, source and specialty weights (a name not listed weighs 1).
Samples sharing (task, source, specialty) form a group of n samples with weight w; each epoch the group
contributes exactly floor(w) full copies plus round((w - floor(w)) * n) samples drawn without replacement
(0 removes the group, 0.3 keeps a fresh 30 % every epoch, 2.5 repeats it twice plus a fresh half). The
group sizes, hence the epoch size and the realised mixture, are the same every epoch; which samples fill the
fractional part and the order are drawn from a generator seeded by (seed, epoch) only. The epoch's index
list is thus a pure function of (seed, epoch): `ResumableBatchSampler` can restart any epoch at any batch,
on any rank, without replaying anything (exact resume).

Works on `SampleColumns` (see splits.py), so it needs no `Sample` objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from surgsigma_train.config.schema import MixtureConfig
from surgsigma_train.data.splits import SampleColumns, close_matches
from surgsigma_train.errors import ConfigError

AXES = ("task", "source", "specialty")


@dataclass
class Mixture:
    columns: SampleColumns
    weights: MixtureConfig
    seed: int
    group_of: np.ndarray = field(init=False)  # group code per sample
    members: list[np.ndarray] = field(init=False)  # sample indices per group, ascending
    group_weight: np.ndarray = field(init=False)
    copies: np.ndarray = field(init=False)  # floor(w) per group
    extra: np.ndarray = field(init=False)  # samples drawn without replacement per group per epoch

    def __post_init__(self) -> None:
        self._check_names()
        codes, sizes, per_sample_weight = [], [], np.ones(len(self.columns))
        for axis in AXES:
            names, code = np.unique(getattr(self.columns, axis), return_inverse=True)
            code = code.reshape(-1)
            table = getattr(self.weights, axis)
            per_sample_weight *= np.array([table.get(n, 1.0) for n in names.tolist()], dtype=float)[code]
            codes.append(code)
            sizes.append(len(names))
        combined = (codes[0] * sizes[1] + codes[1]) * sizes[2] + codes[2]
        _, self.group_of = np.unique(combined, return_inverse=True)
        self.group_of = self.group_of.reshape(-1)
        order = np.argsort(self.group_of, kind="stable")
        bounds = np.cumsum(np.bincount(self.group_of))[:-1]
        self.members = np.split(order, bounds) if len(order) else []
        self.group_weight = np.array([per_sample_weight[m[0]] for m in self.members], dtype=float)
        self.copies = np.floor(self.group_weight).astype(np.int64)
        sizes_n = np.array([len(m) for m in self.members], dtype=np.int64)
        self.extra = np.floor((self.group_weight - self.copies) * sizes_n + 0.5).astype(np.int64)
        if self.epoch_size == 0 and len(self.columns):
            raise ConfigError("data.mixture: the weights remove every training sample")

    def _check_names(self) -> None:
        problems = []
        for axis in AXES:
            known = sorted(set(getattr(self.columns, axis).tolist()))
            for name in getattr(self.weights, axis):
                if name not in known:
                    problems.append(f"data.mixture.{axis}: {name!r} is not a {axis} of the training data"
                                    f"{close_matches(name, known)} (present: {', '.join(known[:30])})")
        if problems:
            raise ConfigError("\n".join(problems))

    @property
    def active(self) -> bool:
        """Whether any weight was given (otherwise the plain per-epoch permutation is used)."""
        return any(getattr(self.weights, axis) for axis in AXES)

    @property
    def epoch_size(self) -> int:
        sizes = np.array([len(m) for m in self.members], dtype=np.int64)
        return int((self.copies * sizes + self.extra).sum())

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The shuffled sample indices of one epoch; depends on (seed, epoch) only."""
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for members, copies, extra in zip(self.members, self.copies.tolist(), self.extra.tolist()):
            if copies:
                parts.append(np.tile(members, copies))
            if extra:
                parts.append(rng.choice(members, extra, replace=False))
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return rng.permutation(np.concatenate(parts)).astype(np.int64)

    def realised(self, indices: np.ndarray | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Counts and shares per task/source/specialty of an epoch (default: from the exact group sizes)."""
        if indices is None:  # groups are pure in every axis: one representative sample per group
            rows = np.array([m[0] for m in self.members], dtype=np.int64)
            weights = (self.copies * np.array([len(m) for m in self.members], dtype=np.int64) + self.extra).astype(float)
        else:
            rows, weights = np.asarray(indices, dtype=np.int64), np.ones(len(indices))
        total = float(weights.sum())
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for axis in AXES:
            names, code = np.unique(getattr(self.columns, axis), return_inverse=True)
            code = code.reshape(-1)
            counts = np.bincount(code[rows], weights=weights, minlength=len(names))
            available = np.bincount(code, minlength=len(names))
            table = getattr(self.weights, axis)
            out[axis] = {name: {"available": int(a), "weight": table.get(name, 1.0), "count": int(round(c)),
                                "share": round(c / total, 6) if total else 0.0}
                         for name, a, c in zip(names.tolist(), available.tolist(), counts.tolist())}
        return out

    def summary(self) -> dict[str, Any]:
        return {"seed": self.seed, "weights": self.weights.model_dump(), "active": self.active,
                "available_samples": len(self.columns), "epoch_size": self.epoch_size,
                "note": "group counts are identical every epoch; the fractional draws and the order are "
                        "re-drawn from (seed, epoch)",
                "per_epoch": self.realised()}

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)


def format_mixture(mixture: Mixture) -> str:
    lines = [f"data mixture: {mixture.epoch_size} samples per epoch from {len(mixture.columns)} "
             f"({'weighted' if mixture.active else 'unweighted'}; same counts every epoch)"]
    for axis, rows in mixture.realised().items():
        lines.append(f"  {axis:<32}{'available':>10} {'weight':>7} {'per epoch':>9} {'share':>7}")
        for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["count"]):
            lines.append(f"    {name:<30} {r['available']:>9} {r['weight']:>7.3g} {r['count']:>9} {r['share']:>7.1%}")
    return "\n".join(lines)
