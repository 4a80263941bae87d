"""Real Slurm on this machine: a 2-process DDP run is sent SIGUSR2 mid-run the way `--signal=B:USR2@...`
does it, saves, exits 75, is requeued by its batch script, resumes and finishes with exactly the losses
of an uninterrupted torchrun run of the same recipe.

The test installs slurm-wlm and munge with apt-get when slurmctld is missing, starts munged, slurmctld
and slurmd on localhost (tests/launch/local_slurm.py) and stops them afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.local_slurm import LocalSlurm, SlurmUnavailable, ensure_installed

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 20
SIGNAL_AFTER_STEP = 4


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def recipe(demo_data, tmp_path_factory) -> Path:
    # the trainer's side of the contract: without it the job could not save, exit 75 and resume
    from surgsigma_train import errors

    assert getattr(errors, "EXIT_PREEMPTED", None) == 75, "surgsigma_train.errors.EXIT_PREEMPTED (75) is missing"
    __import__("surgsigma_train.distributed.preemption")  # ImportError names the missing module
    path = tmp_path_factory.mktemp("recipe") / "tiny_ddp.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"family": "qwen2_5_vl", "source": "tiny"},
        "data": {"train": [{"path": str(demo_data / "train.json")}], "max_seq_len": 512},
        "video": {"sampling": {"num_frames": 4}, "image_max_pixels": 12544, "video_max_pixels": 12544},
        "train": {"seed": 0, "max_steps": MAX_STEPS, "micro_batch_size": 2, "lr": 2e-3, "warmup_steps": 0,
                  "save_every": 0, "log_every": 1, "progress_bar": False},
        "distributed": {"backend": "ddp"},
        "output": {"dir": "unset", "tensorboard": False},
    }))
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> dict[int, float]:
    """The same run without Slurm and without interruption, through launch/torchrun.sh."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), str(recipe), f"output.dir={run_dir}"],
                          env={**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return _losses(run_dir)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _wait(cond, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1)
    tail = log.read_text()[-6000:] if log.exists() else "(no job output yet)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job output:\n{tail}")


def _preempt_requeue_finish(slurm: LocalSlurm, job_id: str, run_dir: Path, log: Path,
                            reference: dict[int, float]) -> None:
    metrics = run_dir / "metrics.jsonl"

    def logged_steps() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    def state() -> str:
        return slurm.job(job_id)["JobState"]

    _wait(lambda: logged_steps() >= SIGNAL_AFTER_STEP or state() in ("FAILED", "COMPLETED", "CANCELLED"),
          f"step {SIGNAL_AFTER_STEP}", log, 300)
    assert state() == "RUNNING", f"job {job_id} is {state()} before the signal:\n{log.read_text()[-4000:]}"
    signalled_at = logged_steps()
    slurm.run("scancel", "--signal=USR2", "--batch", job_id)  # what --signal=B:USR2@lead does: the batch shell
    _wait(lambda: state() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "the job to end", log, 400)

    info = slurm.job(job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    assert info["Restarts"] == "1", f"expected one requeue: {info}\n{text[-4000:]}"
    # one output file, appended by both runs (--open-mode=append)
    assert f"job {job_id} run 1:" in text and f"job {job_id} run 2:" in text, text[-4000:]
    assert "got SIGUSR2" in text and "training step exited with 75" in text and "requeueing job" in text
    assert text.rstrip().endswith("training step exited with 0"), text[-2000:]
    # the preempted run committed a checkpoint mid-run, the requeued one resumed from it and finished
    steps = sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")
                   if (p / "COMMITTED").is_file())
    assert len(steps) == 2 and signalled_at <= steps[0] < MAX_STEPS and steps[1] == MAX_STEPS, steps
    assert f"checkpoints/step-{steps[0]} at step {steps[0]}" in text, text[-4000:]  # "resuming from ..."
    assert json.loads((run_dir / "distributed.json").read_text())["world_size"] == 2
    losses = _losses(run_dir)
    assert list(losses) == list(range(1, MAX_STEPS + 1))
    assert losses[MAX_STEPS] == reference[MAX_STEPS]  # bitwise: the same final loss as never interrupted
    assert losses == reference


def test_sbatch_preempted_requeued_resumes_exactly(slurm, recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    env = {**slurm.env, "NPROC_PER_NODE": "2", "SURGSIGMA_PYTHON": sys.executable}
    done = subprocess.run(["sbatch", "--parsable", f"--output={log}", str(REPO / "launch" / "slurm" / "train.sbatch"),
                           str(recipe), f"output.dir={run_dir}"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, check=True)
    _preempt_requeue_finish(slurm, done.stdout.strip().split(";")[0], run_dir, log, reference)


def test_launch_slurm_cli_preempted_requeued_resumes_exactly(slurm, recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "surgsigma_train.cli", "launch", "slurm", str(recipe),
                           f"output.dir={run_dir}", "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2"],
                          env=slurm.env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = next(line.split()[2] for line in done.stdout.splitlines() if line.startswith("submitted job "))
    _preempt_requeue_finish(slurm, job_id, run_dir, run_dir / "launch" / f"slurm-{job_id}.out", reference)


def test_scancel_is_not_undone_by_a_requeue(slurm, tmp_path):
    """`scancel` sends SIGTERM: the run saves (exit 75) but must stay cancelled, not come back requeued.

    The trainer is a stand-in here (the contract's part: exit 75 after SIGTERM); the batch logic is real."""
    from surgsigma_train.launch.slurm import SlurmJob, render_sbatch

    fake = tmp_path / "fakepython"
    started = tmp_path / "started"
    fake.write_text(f"#!{sys.executable}\nimport pathlib, signal, sys, time\ngot = []\n"
                    "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
                    f"pathlib.Path({str(started)!r}).touch()\n"
                    "for _ in range(1200):\n    time.sleep(0.05)\n    if got:\n        sys.exit(75)\n")
    fake.chmod(0o755)
    log = tmp_path / "job.out"
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(SlurmJob(output=str(log)), ["recipe.yaml"], python=str(fake)))
    job_id = slurm.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    _wait(started.exists, "the stand-in trainer", log, 60)
    slurm.run("scancel", job_id)
    _wait(lambda: slurm.job(job_id)["JobState"] != "RUNNING" and "training step exited" in log.read_text(),
          "the job to end", log, 60)
    time.sleep(3)  # a requeue (the bug this guards against) would show up as PENDING/RUNNING, Restarts=1
    info = slurm.job(job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log.read_text()}"
    assert "not requeueing" in log.read_text()
