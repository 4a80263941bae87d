"""`eval` refuses what would be a misleading score, through the CLI entry point (in-process): a task whose every
sample was dropped or no sample at all (exit 3, with the drops' reasons), and held-out source videos that the
checkpoint was trained on (exit 2 naming them, unless eval.allow_train_overlap=true: then warned and recorded)."""

import json
import shutil
from pathlib import Path

import pytest

from surgsigma_train.cli import main as cli_main

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo.yaml")
FAST = ["eval.max_samples_per_task=1", "eval.max_new_tokens=2", "eval.batch_size=8"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))  # anything but a UserError would raise here: a traceback
    out = capsys.readouterr()
    return code, out.out, out.err


def test_task_with_every_sample_dropped_is_an_error(demo_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    clips = sorted((data / "raw_data" / "DemoLap" / "clips" / "VID03").glob("*.mp4"))
    assert clips
    for clip in clips:  # the files exist (reading accepts them) but no decoder can open them
        clip.write_text("this is not a video\n" * 40)
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "metrics.json").write_text("{}")  # an earlier evaluation's: must not survive as this one's
    code, out, err = run(capsys, "eval", RECIPE, f"data.train.0.path={data / 'heldout.json'}",
                         f"data.eval.0.path={data / 'heldout.json'}", f"output.dir={run_dir}", *FAST)
    assert code == 3, out[-2000:] + err[-2000:]
    assert "no sample of task(s) action_recognition could be evaluated" in err
    dropped = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
               if "dropped" in line]
    assert dropped and all(d["task"] == "action_recognition" for d in dropped)
    for d in dropped:  # which sample, and why
        assert f"{d['id']} (action_recognition): {d['dropped']}" in err
    assert not (run_dir / "eval" / "metrics.json").exists()


def test_no_evaluation_sample_at_all_is_an_error(tmp_path, capsys):
    rows = [{"id": f"m{i}", "image": f"missing{i}.png", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]} for i in range(2)]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(capsys, "eval", RECIPE, f"data.eval.0.path={tmp_path / 'e.jsonl'}",
                         f"output.dir={tmp_path / 'run'}", *FAST)
    assert code == 3, out[-2000:] + err[-2000:]
    assert "no evaluation samples" in err
    assert "m0" in err and "m1" in err and "missing0.png" in err and "media not found" in err


@pytest.fixture(scope="module")
def split_run(demo_data, tmp_path_factory) -> tuple[list[str], Path]:
    """A 1-step run trained on DemoLap/VID02 with DemoLap/VID01 held out by data.split."""
    run_dir = tmp_path_factory.mktemp("split_run")
    common = [f"data.train.0.path={demo_data / 'train.json'}", "data.eval=[]", f"output.dir={run_dir}",
              "train.progress_bar=false", "output.tensorboard=false"]
    held_out_vid01 = ["data.split={eval_videos: [DemoLap/VID01]}"]
    assert cli_main(["train", RECIPE, *common, *held_out_vid01, "train.max_steps=1", "train.warmup_steps=0",
                     "train.micro_batch_size=2"]) == 0
    return common, run_dir


def test_eval_refuses_training_videos_of_the_checkpoint(split_run, capsys):
    common, run_dir = split_run
    checkpoint = run_dir / "checkpoints" / "step-1"
    assert json.loads((checkpoint / "train_videos.json").read_text())["videos"] == ["DemoLap/VID02"]
    other_split = ["data.split={eval_videos: [DemoLap/VID02]}"]  # VID02 "held out": the checkpoint trained on it

    code, out, err = run(capsys, "eval", RECIPE, *common, *other_split, *FAST)
    assert code == 2, out[-2000:] + err[-2000:]
    assert "DemoLap/VID02" in err and "were in the training data of" in err and "eval.allow_train_overlap" in err
    assert not (run_dir / "eval" / "metrics.json").exists()

    code, out, err = run(capsys, "eval", RECIPE, *common, *other_split, *FAST, "eval.allow_train_overlap=true")
    assert code == 0, out[-2000:] + err[-2000:]
    assert "WARNING: eval.allow_train_overlap=true" in err and "DemoLap/VID02" in err
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["train_overlap_videos"] == ["DemoLap/VID02"]

    # the split it was trained with: nothing shared, no warning
    code, out, err = run(capsys, "eval", RECIPE, *common, "data.split={eval_videos: [DemoLap/VID01]}", *FAST)
    assert code == 0, out[-2000:] + err[-2000:]
    assert "allow_train_overlap" not in err + out
    assert "train_overlap_videos" not in json.loads((run_dir / "eval" / "metrics.json").read_text())


def test_checkpoint_without_train_videos_record_is_checked_from_its_recipe(split_run, tmp_path, capsys):
    common, run_dir = split_run
    old = tmp_path / "step-1"  # a checkpoint written before train_videos.json existed
    shutil.copytree(run_dir / "checkpoints" / "step-1", old)
    (old / "train_videos.json").unlink()
    code, out, err = run(capsys, "eval", RECIPE, *common, "data.split={eval_videos: [DemoLap/VID02]}", *FAST,
                         f"checkpoint={old}")
    assert code == 2, out[-2000:] + err[-2000:]
    assert "DemoLap/VID02" in err and "were in the training data of" in err
