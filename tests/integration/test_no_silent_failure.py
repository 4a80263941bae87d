"""Runs that would train on nothing stop, loudly, through the real CLI on real demo files.

* A token plan that disagrees with the processor (what transformers 5.25 did to Qwen3-VL videos: 2 tokens fewer
  per video than the planner counted) is a bug, not bad data: `train` and `validate` exit 1 naming the sample,
  the family, the transformers version and both counts. It used to drop every video sample and exit 0.
* Samples that fail to encode during training beyond data.max_dropped_fraction (over the run or a recent window)
  stop the run with exit 3 and the top reasons; `validate` on the same data fails too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import transformers

from surgsigma_train.cli import main
from surgsigma_train.data.video import planning

pytestmark = pytest.mark.integration
RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml")


def overrides(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        f"data.train.0.path={data / 'train.json'}", "data.eval=[]", f"output.dir={run}",
        "train.micro_batch_size=4", "train.max_steps=12", "train.warmup_steps=0", "train.save_every=0",
        "train.progress_bar=false", "output.tensorboard=false", "train.log_every=1", *extra,
    ]


@pytest.fixture
def off_by_two(monkeypatch):
    """The planner counts 2 more tokens per video than the processor emits (the transformers 5.25 symptom)."""
    real = planning._Planner.video_span_tokens
    monkeypatch.setattr(planning._Planner, "video_span_tokens", lambda self, *a, **k: real(self, *a, **k) + 2)


@pytest.mark.parametrize("command", ["train", "validate", "eval"])
def test_plan_mismatch_stops_with_the_facts(command, demo_data, tmp_path, off_by_two, capsys):
    pytest.importorskip("av")
    extra = ["data.max_bad_fraction=1.0"]
    if command == "eval":  # the untrained tiny model scored on the held-out videos
        extra += [f"data.eval.0.path={demo_data / 'heldout.json'}", "eval.max_samples_per_task=4"]
    args = overrides(demo_data, tmp_path / "run", *extra)
    if command == "eval":
        args.remove("data.eval=[]")
    code = main([command, RECIPE, *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("error: "))
    assert "sample '" in message and ".mp4" in message  # which sample, which file
    assert "qwen2_5_vl processor" in message and f"transformers {transformers.__version__}" in message
    counts = re.search(r"planned (\d+) tokens but .* produced (\d+) ", message)
    assert counts and int(counts[1]) == int(counts[2]) + 2
    if command == "train":
        assert not list((tmp_path / "run").glob("checkpoints/step-*"))  # stopped before any step was saved


def test_every_video_failing_to_decode_stops_training_and_validate(demo_data, tmp_path, capsys):
    pytest.importorskip("av")
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    clips = sorted((data / "raw_data").rglob("*.mp4"))
    assert clips
    for clip in clips:  # the files are still there (the readers find them), but no longer decode
        clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)

    code = main(["validate", RECIPE, *overrides(data, tmp_path / "validate")])
    assert code == 3, capsys.readouterr().err

    code = main(["train", RECIPE, *overrides(data, tmp_path / "run", "data.dropped_window=8")])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Traceback" not in err
    message = next(line for line in err.splitlines() if line.startswith("error: "))
    assert "were dropped over" in message and "data.max_dropped_fraction" in message
    assert "Top reasons" in message and ".mp4" in (tmp_path / "run" / "dropped_samples.jsonl").read_text()


def test_a_few_drops_within_the_allowed_share_train_to_the_end(demo_data, tmp_path, capsys):
    """The same broken videos with a share the user allows: the run completes and counts them."""
    pytest.importorskip("av")
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for clip in sorted((data / "raw_data").rglob("*.mp4")):
        clip.write_bytes(b"not a video")
    code = main(["train", RECIPE, *overrides(data, tmp_path / "run", "data.dropped_window=8",
                                            "data.max_dropped_fraction=0.9")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "dropped_samples.jsonl").read_text().count("\n") > 0
