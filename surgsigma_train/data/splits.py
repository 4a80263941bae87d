"""Train / held-out splits by source video (patient), on lightweight per-sample columns.

Surgical frames are sampled at 1 fps, so neighbouring frames of one video are near-duplicates: a split
that cuts through a video puts the same scene on both sides and inflates held-out scores. The unit of
a split is therefore `Sample.split_key` (the source video; the sample id when a sample has none).

Everything here works on `SampleColumns` (one array entry per sample: task, source, specialty, split
key) and returns index arrays, so the same code serves today's `list[Sample]` and a memory-mapped
index of millions of conversations.

Rules (`data.split`, see config/schema.py SplitConfig):
- `by: video` with `eval_ratio`: the unique split keys are sorted, then per source dataset (`stratify`,
  default) a seeded permutation holds out round(ratio * n) of its n videos, at least 1 and at most n-1
  (a source with a single video stays in training). The result depends only on the set of keys, the
  seed and the ratio, not on sample order; each source has its own random stream, so adding a source
  does not reshuffle the others.
- `by: video` with explicit lists: `eval_videos` are held out; `train_videos` (default: every other
  video) are trained on; with both lists, videos in neither are left out and counted. A video in both
  lists, or a listed video absent from the data, is an error naming it. Lists and a ratio exclude each other.
- `by: sample`: a seeded frame-level split. Allowed for experiments, but it leaks; a warning says so
  (logged and returned in the report).
"""

from __future__ import annotations

import difflib
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from surgsigma_train.config.schema import SplitConfig
from surgsigma_train.data.sample import Sample
from surgsigma_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FRAME_SPLIT_WARNING = (
    "data.split.by=sample is a frame-level split: neighbouring 1-fps frames of one source video are "
    "near-duplicates, so frames of the same patient land on both sides and held-out scores are inflated by "
    "leakage. Use by: video for any number you report."
)


@dataclass(frozen=True)
class SampleColumns:
    """What splits and mixtures need to know about each sample, as parallel arrays (object dtype, str)."""

    task: np.ndarray
    source: np.ndarray
    specialty: np.ndarray
    split_key: np.ndarray

    def __post_init__(self) -> None:
        lengths = {len(self.task), len(self.source), len(self.specialty), len(self.split_key)}
        if len(lengths) != 1:
            raise ValueError(f"columns of different lengths: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.task)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "SampleColumns":
        # A missing source or specialty is its own named group ("unknown"), so it can be weighted too.
        def column(values: list[Any]) -> np.ndarray:
            return np.array([str(v) if v is not None else "unknown" for v in values], dtype=object)

        return cls(column([s.task for s in samples]), column([s.source for s in samples]),
                   column([s.specialty for s in samples]), column([s.split_key for s in samples]))

    def take(self, indices: np.ndarray) -> "SampleColumns":
        return SampleColumns(self.task[indices], self.source[indices], self.specialty[indices],
                             self.split_key[indices])


@dataclass
class SplitResult:
    train: np.ndarray  # int64 sample indices, ascending
    eval: np.ndarray
    report: dict[str, Any]


def close_matches(name: str, known: Sequence[str]) -> str:
    found = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(map(repr, found))}?)" if found else ""


def _hold_out(n: int, ratio: float) -> int:
    """Videos held out of a group of n: round half up, at least one, never all of them."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(np.floor(ratio * n + 0.5))))


def split_indices(columns: SampleColumns, cfg: SplitConfig) -> SplitResult:
    """Indices of the training and held-out samples under `cfg`. Raises ConfigError / DataError."""
    lists = cfg.train_videos is not None or cfg.eval_videos is not None
    if lists and cfg.eval_ratio > 0:
        raise ConfigError("data.split: give either eval_ratio or train_videos/eval_videos, not both")
    if not lists and cfg.eval_ratio == 0:
        raise ConfigError("data.split: nothing is held out; set eval_ratio > 0 or list eval_videos/train_videos")
    if len(columns) == 0:
        raise DataError("data.split: there are no training samples to split")
    keys, first, inverse = np.unique(columns.split_key, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    report: dict[str, Any] = {"by": cfg.by, "seed": cfg.seed, "eval_ratio": cfg.eval_ratio,
                              "stratify": cfg.stratify, "warnings": []}

    if cfg.by == "sample":
        if lists:
            raise ConfigError("data.split: train_videos/eval_videos need by: video")
        report["warnings"].append(FRAME_SPLIT_WARNING)
        log.warning(FRAME_SPLIT_WARNING)
        n = len(columns)
        n_eval = _hold_out(n, cfg.eval_ratio)
        is_eval = np.zeros(n, dtype=bool)
        is_eval[np.random.default_rng(cfg.seed).permutation(n)[:n_eval]] = True
        train, held = np.flatnonzero(~is_eval), np.flatnonzero(is_eval)
        shared = np.intersect1d(inverse[train], inverse[held])
        report.update(train_samples=len(train), eval_samples=len(held), videos_in_both=len(shared))
        return SplitResult(train, held, report)

    key_set = set(keys.tolist())
    if lists:
        train_list, eval_list = list(cfg.train_videos or []), list(cfg.eval_videos or [])
        both = sorted(set(train_list) & set(eval_list))
        if both:
            raise ConfigError(f"data.split: video(s) in both train_videos and eval_videos: {', '.join(both[:20])}")
        absent = [v for v in dict.fromkeys(train_list + eval_list) if v not in key_set]
        if absent:
            raise DataError("data.split lists video(s) that no training sample comes from: " + "; ".join(
                f"{v!r}{close_matches(v, keys.tolist())}" for v in absent[:20]))
        in_eval = np.isin(keys, np.array(eval_list, dtype=object))
        in_train = np.isin(keys, np.array(train_list, dtype=object)) if cfg.train_videos is not None else ~in_eval
        if cfg.eval_videos is None:
            in_eval = ~in_train
    else:
        strata = columns.source[first] if cfg.stratify else np.full(len(keys), "all", dtype=object)
        in_eval = np.zeros(len(keys), dtype=bool)
        for stratum in sorted(set(strata.tolist())):
            members = np.flatnonzero(strata == stratum)  # in sorted key order: independent of sample order
            rng = np.random.default_rng([cfg.seed, zlib.crc32(stratum.encode())])
            in_eval[rng.permutation(members)[:_hold_out(len(members), cfg.eval_ratio)]] = True
        in_train = ~in_eval
        if not in_eval.any():
            raise DataError(f"data.split.eval_ratio={cfg.eval_ratio} holds out no video: every source dataset "
                            "has a single source video (a split by patient needs at least two)")

    train, held = np.flatnonzero(in_train[inverse]), np.flatnonzero(in_eval[inverse])
    unassigned = ~(in_train | in_eval)
    report.update(
        train_videos=int(in_train.sum()), eval_videos=int(in_eval.sum()), train_samples=len(train),
        eval_samples=len(held), unassigned_videos=int(unassigned.sum()),
        unassigned_samples=int(len(columns) - len(train) - len(held)),
        held_out_videos=keys[in_eval].tolist(),
    )
    return SplitResult(train, held, report)


def shared_videos(train_keys: np.ndarray, eval_keys: np.ndarray) -> list[str]:
    """Source videos that occur on both sides (sorted)."""
    return sorted(set(train_keys.tolist()) & set(eval_keys.tolist()))


def check_disjoint(train: SampleColumns, held_out: SampleColumns, *, allow_leak: bool = False) -> list[str]:
    """Error (or, with allow_leak, a returned warning) when a source video is on both sides of the split."""
    shared = shared_videos(train.split_key, held_out.split_key)
    if not shared:
        return []
    message = (f"{len(shared)} source video(s) occur in both the training and the held-out data "
               f"(e.g. {', '.join(shared[:10])}); frames of one patient on both sides leak")
    if allow_leak:
        log.warning(message)
        return [message]
    raise DataError(message + ". Make data.train and data.eval disjoint by video, or use data.split.")


def format_split(report: dict[str, Any]) -> str:
    if report["by"] == "sample":
        text = (f"split by sample (seed {report['seed']}): {report['train_samples']} train / "
                f"{report['eval_samples']} held-out samples; {report['videos_in_both']} videos on both sides")
    else:
        text = (f"split by source video (seed {report['seed']}): {report['train_videos']} train videos "
                f"({report['train_samples']} samples) / {report['eval_videos']} held-out videos "
                f"({report['eval_samples']} samples)")
        if report["unassigned_videos"]:
            text += f"; {report['unassigned_videos']} videos ({report['unassigned_samples']} samples) in neither list"
    return "\n".join([text, *(f"WARNING: {w}" for w in report["warnings"])])
