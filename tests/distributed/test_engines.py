"""CPU, 2 processes over gloo under torchrun: every backend, crashes, a save killed halfway, NaN, preemption.

All runs train the tiny random Qwen2.5-VL on the demo data with the same global batch (2 samples x 2
micro-batches per step) and a constant LR, so any run's loss curve is a prefix of the 1-process
reference. Tolerance between 1 and 2 processes: 1e-4 absolute on a loss of ~11 (measured: < 1e-5; the
difference is float32 summation order of the averaged gradients). One process vs itself: bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from surgsigma_train.errors import EXIT_PREEMPTED

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4
COMMON = ["train.progress_bar=false", "output.tensorboard=false", "train.warmup_steps=0", "train.log_every=1",
          "train.lr=1e-3", "train.lr_schedule=constant", "train.grad_accum_steps=2", "train.save_every=2"]


def command(demo_data: Path, run_dir: Path, procs: int, *overrides: str) -> list[str]:
    data = [f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
            f"output.dir={run_dir}", f"train.micro_batch_size={2 // procs}"]
    cli = ["-m", "surgsigma_train.cli", "train", str(REPO / "recipes" / "demo.yaml"), *data, *COMMON, *overrides]
    if procs == 1:
        return [sys.executable, *cli]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    return torchrun + cli


def run(demo_data: Path, run_dir: Path, procs: int, *overrides: str, env: dict[str, str] | None = None,
        expect: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(demo_data, run_dir, procs, *overrides), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=400)
    if expect is not None:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a resumed run appends, so the later line of a step wins."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def assert_close(curve: dict[int, float], reference: dict[int, float], steps: range, tol: float) -> None:
    for s in steps:
        assert abs(curve[s] - reference[s]) <= tol, (s, curve[s], reference[s])


def committed(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "COMMITTED").is_file())


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory) -> dict[int, float]:
    """One process, 12 steps, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(demo_data, run_dir, 1, "train.max_steps=12")
    return losses(run_dir)


BACKENDS = {
    "ddp": ["distributed.backend=ddp"],
    "zero2": ["distributed.backend=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.backend=deepspeed", "distributed.zero_stage=3"],
    "fsdp2": ["distributed.backend=fsdp2"],
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_processes_shard_and_match_one_process(demo_data, tmp_path, reference, backend):
    run(demo_data, tmp_path, 2, "train.max_steps=6", *BACKENDS[backend])
    layout = json.loads((tmp_path / "distributed.json").read_text())
    assert layout["world_size"] == 2 and len(layout["ranks"]) == 2
    for rank in layout["ranks"]:
        if backend in ("zero3", "fsdp2"):  # parameters sharded: each rank holds about half
            assert rank["params_local"] <= rank["params_global"] * 0.55
        else:
            assert rank["params_local"] == rank["params_global"]
        if backend == "ddp":  # optimizer state replicated
            assert rank["optim_state_local"] == rank["optim_state_global"] > 0
        else:  # optimizer state sharded
            assert 0 < rank["optim_state_local"] <= rank["optim_state_global"] * 0.55
    assert_close(losses(tmp_path), reference, range(1, 7), TOL)
    checkpoint = tmp_path / "checkpoints" / "step-6"
    assert (checkpoint / "COMMITTED").is_file() and (checkpoint / "model" / "model.safetensors").is_file()
    assert (checkpoint / "rng-rank0.pt").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    assert json.loads((tmp_path / "exit_status.json").read_text())["exit_code"] == 0


def test_kill9_mid_accumulation_resumes_bitwise_one_process(demo_data, tmp_path, reference):
    # killed in step 5 after its first of two micro-batches; step-4 is the last committed checkpoint
    crashed = run(demo_data, tmp_path, 1, "train.max_steps=6", env={"SURGSIGMA_TEST_SIGKILL": "micro:5:0"}, expect=None)
    assert crashed.returncode == -signal.SIGKILL
    assert committed(tmp_path) == ["step-2", "step-4"]
    resumed = run(demo_data, tmp_path, 1, "train.max_steps=6")
    assert "resuming from" in resumed.stdout and "step-4 at step 4" in resumed.stdout
    curve = losses(tmp_path)
    assert [curve[s] for s in range(1, 7)] == [reference[s] for s in range(1, 7)]  # bitwise


def test_kill9_one_rank_mid_accumulation_resumes_two_processes(demo_data, tmp_path, reference):
    fsdp2 = BACKENDS["fsdp2"]
    env = {"SURGSIGMA_TEST_SIGKILL": "micro:5:0", "SURGSIGMA_TEST_SIGKILL_RANK": "1"}
    crashed = run(demo_data, tmp_path, 2, "train.max_steps=6", *fsdp2, env=env, expect=None)
    assert crashed.returncode != 0
    assert committed(tmp_path) == ["step-2", "step-4"]
    run(demo_data, tmp_path, 2, "train.max_steps=6", *fsdp2)  # sharded optimizer state restored from step-4
    assert_close(losses(tmp_path), reference, range(1, 7), TOL)


def test_save_killed_halfway_resumes_from_previous_commit(demo_data, tmp_path, reference):
    crashed = run(demo_data, tmp_path, 1, "train.max_steps=6", env={"SURGSIGMA_TEST_SIGKILL": "save:4"}, expect=None)
    assert crashed.returncode == -signal.SIGKILL
    assert committed(tmp_path) == ["step-2"] and (tmp_path / "checkpoints" / "step-4.tmp").is_dir()
    resumed = run(demo_data, tmp_path, 1, "train.max_steps=6")
    assert "removed uncommitted checkpoint folder" in resumed.stdout and "step-2 at step 2" in resumed.stdout
    assert not (tmp_path / "checkpoints" / "step-4.tmp").exists()
    curve = losses(tmp_path)
    assert [curve[s] for s in range(1, 7)] == [reference[s] for s in range(1, 7)]


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_nan_on_one_rank_is_skipped_by_both(demo_data, tmp_path, reference, backend):
    proc = run(demo_data, tmp_path, 2, "train.max_steps=4", "distributed.debug_nan_step=2",
               "distributed.debug_nan_rank=1", *BACKENDS[backend])
    out = proc.stdout + proc.stderr
    assert "step 2: skipped on rank 0" in out and "step 2: skipped on rank 1" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert rows[0]["loss"] == pytest.approx(reference[1], abs=TOL)
    state = json.loads((tmp_path / "checkpoints" / "step-4" / "trainer_state.json").read_text())["trainer"]
    assert state["skipped_steps"] == 1 and state["step"] == 4
    assert json.loads((tmp_path / "exit_status.json").read_text())["exit_code"] == 0


def test_sigusr2_saves_exits_75_and_rerun_resumes(demo_data, tmp_path, reference):
    args = command(demo_data, tmp_path, 2, "train.max_steps=12", *BACKENDS["zero3"])
    launcher = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it could be signalled"
        time.sleep(0.02)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len(workers) == 2
    for worker in workers:  # what `scancel --signal=USR2` / Slurm's --signal do: every task gets it
        worker.send_signal(signal.SIGUSR2)
    output, _ = launcher.communicate(timeout=300)
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status["exit_code"] == EXIT_PREEMPTED, output[-5000:]
    # torchrun itself exits 1 whenever a worker fails; its summary names the workers' own code
    assert launcher.returncode != 0 and "exitcode  : 75" in output, output[-3000:]
    stopped = status["step"]
    assert 2 <= stopped < 12 and committed(tmp_path)[-1] == f"step-{stopped}"
    run(demo_data, tmp_path, 2, "train.max_steps=12", *BACKENDS["zero3"])
    assert json.loads((tmp_path / "exit_status.json").read_text())["exit_code"] == 0
    assert_close(losses(tmp_path), reference, range(1, 13), TOL)


LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.lr=5e-3"]


@pytest.fixture(scope="module")
def lora_reference(demo_data, tmp_path_factory) -> dict[int, float]:
    """LoRA, one process, 4 steps, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("lora-reference")
    run(demo_data, run_dir, 1, "train.max_steps=4", *LORA)
    return losses(run_dir)


@pytest.mark.parametrize("backend", ["ddp", "zero3", "fsdp2"])
def test_lora_two_processes_match_one_process(demo_data, tmp_path, lora_reference, backend):
    run(demo_data, tmp_path, 2, "train.max_steps=4", *LORA, *BACKENDS[backend])
    layout = json.loads((tmp_path / "distributed.json").read_text())
    assert layout["world_size"] == 2 and len(layout["ranks"]) == 2
    if backend in ("zero3", "fsdp2"):
        assert all(rank["params_local"] <= rank["params_global"] * 0.55 for rank in layout["ranks"])
    curve = losses(tmp_path)
    assert_close(curve, lora_reference, range(1, 5), TOL)
    assert curve[4] < curve[1] - 0.05  # the adapters really train
    checkpoint = tmp_path / "checkpoints" / "step-4"
    assert (checkpoint / "COMMITTED").is_file() and (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
