import json
import subprocess
import sys
from pathlib import Path

import pytest

from surgsigma_train.evaluation.evaluate import normalize_answer, select_eval_samples
from surgsigma_train.data.sample import Message, Sample

REPO = Path(__file__).resolve().parents[2]


def test_normalize_answer():
    assert normalize_answer("The reflected phase is  Preparation.") == "the reflected phase is preparation"
    assert normalize_answer("<think> Level 1: x </think><answer> The phase is X. </answer>") == "the phase is x"
    assert normalize_answer("grasper (1,2),(3,4)") != normalize_answer("grasper (1,2),(3,5)")


def test_select_eval_samples_per_task():
    samples = [Sample(id=str(i), task="ab"[i % 2], messages=(Message("assistant", "x"),)) for i in range(10)]
    chosen = select_eval_samples(samples, 2)
    assert [s.id for s in chosen] == ["0", "1", "4", "5"]  # spread over each task's samples, not the first ones
    assert len(select_eval_samples(samples, 9)) == 10


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgsigma_train.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


@pytest.mark.integration
def test_train_then_eval_cli(demo_data, tmp_path):
    data = [f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
            f"output.dir={tmp_path / 'run'}", "train.warmup_steps=0", "train.progress_bar=false"]
    assert cli("validate", "recipes/demo.yaml", *data).returncode == 0
    train = cli("train", "recipes/demo.yaml", *data, "train.max_steps=2")
    assert train.returncode == 0, train.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    ev = cli("eval", "recipes/demo.yaml", *data, f"checkpoint={checkpoint}", "eval.max_samples_per_task=2",
             "eval.max_new_tokens=4")
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"phase_recognition", "instrument_recognition", "instrument_localization",
                                     "triplet_recognition", "safety_assessment", "action_recognition"}
    for task, m in metrics["tasks"].items():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["n"] == 2, (task, m)
    assert metrics["checkpoint"] == str(checkpoint)
    predictions = (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 12 and all("reference" in json.loads(p) for p in predictions)
    assert "phase_recognition" in ev.stdout


def test_validate_reports_bad_data(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}) + "\n{broken\n")
    proc = cli("validate", "recipes/demo.yaml", f"data.train.0.path={tmp_path / 'd.jsonl'}", "data.eval=[]")
    assert proc.returncode == 3
    assert "line 2" in proc.stdout and "malformed JSON" in proc.stdout
    assert "bad a: media not found under" in proc.stdout and "missing.png" in proc.stdout
    missing = cli("validate", "recipes/demo.yaml", f"data.train.0.path={tmp_path / 'nope.json'}")
    assert missing.returncode == 3 and "does not exist" in missing.stdout
