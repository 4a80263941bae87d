"""Patient-level splits (surgsigma_train.data.splits) and their hook into prepare_run."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from surgsigma_train.config.loading import load_recipe
from surgsigma_train.config.schema import SplitConfig
from surgsigma_train.data.splits import FRAME_SPLIT_WARNING, SampleColumns, split_indices
from surgsigma_train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


def random_columns(rng: np.random.Generator) -> SampleColumns:
    """Random sources, videos per source and samples per video, in a random sample order."""
    rows = []
    for s in range(rng.integers(1, 5)):
        for v in range(rng.integers(1, 16)):
            rows += [(f"task{rng.integers(3)}", f"src{s}", "spec", f"src{s}/VID{v:02d}")] * int(rng.integers(1, 21))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return SampleColumns(*(np.array(col, dtype=object) for col in zip(*rows)))


def test_no_source_video_in_two_splits_over_many_random_data_sets_and_seeds():
    rng = np.random.default_rng(1234)
    checked = 0
    for trial in range(300):
        cols = random_columns(rng)
        cfg = SplitConfig(eval_ratio=float(rng.uniform(0.05, 0.9)), seed=int(rng.integers(1000)),
                          stratify=bool(rng.integers(2)))
        videos_per_stratum = Counter(
            (src if cfg.stratify else "all") for src in dict(zip(cols.split_key, cols.source)).values())
        if all(n < 2 for n in videos_per_stratum.values()):
            with pytest.raises(DataError, match="holds out no video"):
                split_indices(cols, cfg)
            continue
        result = split_indices(cols, cfg)
        train_keys, eval_keys = set(cols.split_key[result.train]), set(cols.split_key[result.eval])
        assert not train_keys & eval_keys, trial
        assert sorted(result.train.tolist() + result.eval.tolist()) == list(range(len(cols)))  # every sample once
        # per stratum: round(ratio * n) held out, at least one, never all
        held = Counter((cols.source[cols.split_key == k][0] if cfg.stratify else "all") for k in eval_keys)
        for stratum, n in videos_per_stratum.items():
            expected = 0 if n < 2 else min(n - 1, max(1, int(np.floor(cfg.eval_ratio * n + 0.5))))
            assert held.get(stratum, 0) == expected, (trial, stratum)
        # a function of the set of videos and the seed, not of the sample order
        order = rng.permutation(len(cols))
        again = split_indices(cols.take(order), cfg)
        assert set(cols.take(order).split_key[again.eval]) == eval_keys
        checked += 1
    assert checked > 200


def test_explicit_video_lists():
    cols = SampleColumns(*(np.array(c, dtype=object) for c in zip(
        *[("t", "S", "x", f"S/VID{v:02d}") for v in range(1, 6) for _ in range(3)])))
    result = split_indices(cols, SplitConfig(eval_videos=["S/VID02", "S/VID05"]))
    assert set(cols.split_key[result.eval]) == {"S/VID02", "S/VID05"}
    assert set(cols.split_key[result.train]) == {"S/VID01", "S/VID03", "S/VID04"}
    both = split_indices(cols, SplitConfig(train_videos=["S/VID01"], eval_videos=["S/VID03"]))
    assert len(both.train) == len(both.eval) == 3
    assert both.report["unassigned_videos"] == 3 and both.report["unassigned_samples"] == 9
    only_train = split_indices(cols, SplitConfig(train_videos=["S/VID01", "S/VID02"]))
    assert set(cols.split_key[only_train.eval]) == {"S/VID03", "S/VID04", "S/VID05"}
    with pytest.raises(ConfigError, match="in both train_videos and eval_videos: S/VID03"):
        split_indices(cols, SplitConfig(train_videos=["S/VID03"], eval_videos=["S/VID03"]))
    with pytest.raises(DataError, match=r"'S/VID9'.*did you mean 'S/VID0\d'"):
        split_indices(cols, SplitConfig(eval_videos=["S/VID01", "S/VID9"]))
    with pytest.raises(ConfigError, match="not both"):
        split_indices(cols, SplitConfig(eval_videos=["S/VID01"], eval_ratio=0.2))
    with pytest.raises(ConfigError, match="nothing is held out"):
        split_indices(cols, SplitConfig())


def test_frame_level_split_warns(caplog):
    cols = SampleColumns(*(np.array(c, dtype=object) for c in zip(
        *[("t", "S", "x", f"S/VID{v}") for v in range(4) for _ in range(10)])))
    with caplog.at_level(logging.WARNING):
        result = split_indices(cols, SplitConfig(by="sample", eval_ratio=0.25, seed=3))
    assert result.report["warnings"] == [FRAME_SPLIT_WARNING] and "1-fps frames" in caplog.text
    assert len(result.eval) == 10 and result.report["videos_in_both"] > 0
    with pytest.raises(ConfigError, match="need by: video"):
        split_indices(cols, SplitConfig(by="sample", eval_videos=["S/VID1"]))


def _recipe(demo_data: Path, run_dir: Path, *overrides: str):
    return load_recipe(REPO / "recipes" / "demo.yaml", [
        f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
        f"output.dir={run_dir}", *overrides])


def test_train_and_eval_runs_use_the_same_split(demo_data, tmp_path):
    from surgsigma_train.training.run import prepare_run

    cfg = _recipe(demo_data, tmp_path / "run", "data.split.eval_videos=[DemoLap/VID02]")
    train_ctx = prepare_run(cfg)
    eval_ctx = prepare_run(cfg, need_train=False, write_record=False)
    assert {s.split_key for s in train_ctx.train_samples} == {"DemoLap/VID01"}
    assert [s.id for s in eval_ctx.eval_samples] == [s.id for s in train_ctx.eval_samples]
    assert {s.split_key for s in eval_ctx.eval_samples} == {"DemoLap/VID02", "DemoLap/VID03"}
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["held_out_videos"] == ["DemoLap/VID02"] and saved["train_samples"] == len(train_ctx.train_samples)
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["split"]["eval_videos"] == 1


def test_overlapping_train_and_eval_data_is_an_error(demo_data, tmp_path):
    from surgsigma_train.training.run import apply_split, read_samples

    cfg = _recipe(demo_data, tmp_path, f"data.eval.0.path={demo_data / 'train.json'}")
    train, _ = read_samples(cfg.data.train, cfg.data.task_ids)
    with pytest.raises(DataError, match="2 source video.*DemoLap/VID01, DemoLap/VID02"):
        apply_split(cfg, train, list(train))
    leaky = _recipe(demo_data, tmp_path, "data.split.by=sample", "data.split.eval_ratio=0.3")
    kept, held, report = apply_split(leaky, train, [])
    assert len(kept) + len(held) == len(train) and FRAME_SPLIT_WARNING in report["warnings"]
    assert any("occur in both" in w for w in report["warnings"])
