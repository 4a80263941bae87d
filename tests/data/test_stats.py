"""`surgsigma-train data stats` (surgsigma_train.data.stats) on the demo data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import Image

from surgsigma_train.cli import main
from surgsigma_train.config.loading import load_recipe
from surgsigma_train.data.encode import SampleEncoder
from surgsigma_train.data.stats import compute_stats, planned_length

REPO = Path(__file__).resolve().parents[2]


def _recipe(demo_data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
            f"output.dir={run_dir}", *overrides]


def test_counts_match_the_data_and_plots_are_pngs(demo_data, tmp_path):
    from surgsigma_train.training.run import read_samples

    cfg = load_recipe(REPO / "recipes" / "demo.yaml", _recipe(demo_data, tmp_path, "data.split.eval_videos=[DemoLap/VID02]"))
    result = compute_stats(cfg)
    train, _ = read_samples(cfg.data.train, cfg.data.task_ids)
    held, _ = read_samples(cfg.data.eval, cfg.data.task_ids)
    everything = train + held
    assert result["samples"] == len(everything)
    assert result["counts"]["task"] == dict(Counter(s.task for s in everything))
    assert result["counts"]["source"] == dict(Counter(s.source for s in everything))
    assert result["counts"]["specialty"] == dict(Counter(s.specialty for s in everything))
    moved = sum(s.split_key == "DemoLap/VID02" for s in train)
    assert result["counts"]["split"] == {"train": len(train) - moved, "eval": len(held) + moved}
    assert result["videos"] == {"train": 1, "eval": 2}
    assert {t: d["n"] for t, d in result["tokens"].items()} == result["counts"]["task"]
    assert result["not_measured"]["count"] == 0
    assert json.loads((tmp_path / "stats" / "stats.json").read_text())["counts"] == result["counts"]
    names = sorted(Path(p).name for p in result["plots"])
    assert names == sorted(["counts.png"] + [f"tokens_{t}.png" for t in result["counts"]["task"]])
    for path in result["plots"]:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
            img.verify()


def test_planned_lengths_equal_the_encoded_lengths(demo_data, tmp_path):
    """Stats decode nothing, yet each length is the len(input_ids) training would see (images and videos)."""
    from surgsigma_train.models.registry import get_family
    from surgsigma_train.training.run import build_processor, read_samples

    cfg = load_recipe(REPO / "recipes" / "demo.yaml", _recipe(demo_data, tmp_path))
    family = get_family(cfg.model.family)
    encoder = SampleEncoder(build_processor(cfg, family), family, cfg.data, cfg.video, seed=0)
    samples, _ = read_samples(cfg.data.eval, cfg.data.task_ids)
    one_per_task = list({s.task: s for s in samples}.values())
    assert any(ref.kind == "video" for s in one_per_task for ref in s.media)
    for s in one_per_task:
        assert planned_length(encoder, s) == encoder.encode(s).input_ids.numel(), s.id


def test_cli_stats_with_max_samples(demo_data, tmp_path, capsys):
    code = main(["data", "stats", str(REPO / "recipes" / "demo.yaml"), *_recipe(demo_data, tmp_path),
                 "--max-samples", "12"])
    out = capsys.readouterr().out
    assert code == 0
    assert "by task:" in out and "by split:" in out and "tokens per sample (12 measured" in out
    saved = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert saved["measured_samples"] == 12 == sum(d["n"] for d in saved["tokens"].values())
    assert saved["tokens_all"]["p0"] <= saved["tokens_all"]["p50"] <= saved["tokens_all"]["p100"]


def test_cli_stats_names_a_misspelled_split_video(demo_data, tmp_path, capsys):
    code = main(["data", "stats", str(REPO / "recipes" / "demo.yaml"), *_recipe(demo_data, tmp_path),
                 "data.split.eval_videos=[DemoLap/VID2]"])
    assert code == 3 and "did you mean 'DemoLap/VID02'" in capsys.readouterr().err
