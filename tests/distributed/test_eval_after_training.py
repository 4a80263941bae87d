"""eval.after_training under torchrun (2 CPU processes, gloo, DDP): the evaluation runs once, on rank 0, after
training; rank 1 leaves cleanly instead of writing the same predictions.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_eval_after_training_runs_once_on_rank_zero(demo_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "surgsigma_train.cli", "train", str(REPO / "recipes" / "demo.yaml"),
           f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
           f"output.dir={tmp_path}", "distributed.backend=ddp", "train.max_steps=2", "train.warmup_steps=0",
           "train.micro_batch_size=1", "train.progress_bar=false", "output.tensorboard=false",
           "eval.after_training=true", "eval.max_samples_per_task=2", "eval.max_new_tokens=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert output.count("rank 0: evaluating after training (world size 2)") == 1
    assert "rank 1: evaluating" not in output
    assert output.count("rank 1: training done; evaluation after training runs on rank 0 only") == 1
    assert output.count("held-out evaluation (") == 1  # one evaluation printed its table
    assert "still referenced" not in output  # the trained model was freed before the evaluation model loaded
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 12  # 6 tasks x 2 samples, each once
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(tmp_path / "checkpoints" / "step-2")
    assert sum(m["n"] for m in metrics["tasks"].values()) == 12
    assert json.loads((tmp_path / "exit_status.json").read_text())["exit_code"] == 0
