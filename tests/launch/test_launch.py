"""Launchers without Slurm: the sbatch rendering, `launch slurm --dry-run`, the batch script's exit-code
and signal logic (run by bash against stand-in srun/scontrol/sbatch programs), and the torchrun wrapper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from surgsigma_train.cli import main as cli_main
from surgsigma_train.config.loading import load_recipe
from surgsigma_train.launch.slurm import SlurmJob, render_generic, render_sbatch
from surgsigma_train.launch.torchrun import child_pids, exit_code_of

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _demo_overrides(demo_data: Path, run_dir: Path) -> list[str]:
    return [f"data.train.0.path={demo_data / 'train.json'}", f"data.eval.0.path={demo_data / 'heldout.json'}",
            f"output.dir={run_dir}"]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_repository_sbatch_is_the_rendered_template():
    # launch/slurm/train.sbatch is generated from the package template; they must not drift apart
    assert (REPO / "launch" / "slurm" / "train.sbatch").read_text() == render_generic()


def test_render_header_and_syntax(tmp_path):
    job = SlurmJob(nodes=4, gpus_per_node=8, partition="gpu", time="24:00:00", account="proj", signal_lead_s=600,
                   cpus_per_task=64, extra=["--qos=high"])
    text = render_sbatch(job, ["/runs/x/launch/recipe.yaml"], python="/opt/venv/bin/python")
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert header == ["#SBATCH --job-name=surgsigma", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --partition=gpu",
                      "#SBATCH --time=24:00:00", "#SBATCH --account=proj", "#SBATCH --signal=B:USR2@600",
                      "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --output=slurm-%j.out",
                      "#SBATCH --qos=high"]
    assert 'NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"' in text
    assert 'PYTHON="${SURGSIGMA_PYTHON:-/opt/venv/bin/python}"' in text
    assert '"$PYTHON" /runs/x/launch/recipe.yaml &' in text
    assert "USR1" not in text.replace("SIGUSR1 is left alone", "")  # NCCL owns SIGUSR1
    script = tmp_path / "t.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_launch_slurm_dry_run_writes_recipe_and_script(demo_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", f"echo called >> {tmp_path / 'sbatch_calls'}\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "runs" / "r1"
    overrides = _demo_overrides(demo_data, run_dir) + ["train.max_steps=70", "distributed.backend=ddp"]
    code = cli_main(["launch", "slurm", str(REPO / "recipes" / "demo.yaml"), *overrides, "--nodes", "2",
                     "--gpus-per-node", "4", "--partition", "p1", "--time", "1:00:00", "--dry-run"])
    assert code == 0
    assert not (tmp_path / "sbatch_calls").exists(), "--dry-run must not submit"
    recipe = run_dir / "launch" / "recipe.yaml"
    script = run_dir / "launch" / "train.sbatch"
    assert f"batch script: {script}" in capsys.readouterr().out
    # the written recipe is the resolved one: it loads without the overrides and equals the original with them
    assert load_recipe(recipe) == load_recipe(REPO / "recipes" / "demo.yaml", overrides)
    assert yaml.safe_load(recipe.read_text())["train"]["max_steps"] == 70
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=p1",
                 "#SBATCH --time=1:00:00", f"#SBATCH --chdir={tmp_path}", "#SBATCH --job-name=surgsigma-r1",
                 f"#SBATCH --output={run_dir / 'launch' / 'slurm-%j.out'}", "#SBATCH --signal=B:USR2@300"):
        assert line in text.splitlines(), line
    assert f'PYTHON="${{SURGSIGMA_PYTHON:-{sys.executable}}}"' in text
    assert f'"$PYTHON" {recipe} &' in text


def test_launch_slurm_submits_and_prints_job_id(demo_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", f'echo "$@" > {tmp_path / "sbatch_args"}\necho "4242;cluster"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    assert cli_main(["launch", "slurm", str(REPO / "recipes" / "demo.yaml"), *_demo_overrides(demo_data, run_dir),
                     "--nodes", "1", "--gpus-per-node", "0"]) == 0
    assert "submitted job 4242" in capsys.readouterr().out
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", str(run_dir / "launch" / "train.sbatch")]
    _stub(bin_dir, "sbatch", 'echo "sbatch: error: invalid partition" >&2; exit 1\n')
    assert cli_main(["launch", "slurm", str(REPO / "recipes" / "demo.yaml"), *_demo_overrides(demo_data, run_dir)]) == 1
    assert "invalid partition" in capsys.readouterr().err


def test_launch_slurm_rejects_bad_recipe_before_writing(demo_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    base = [str(REPO / "recipes" / "demo.yaml"), *_demo_overrides(demo_data, run_dir)]
    assert cli_main(["launch", "slurm", *base, "train.max_stepz=3", "--dry-run"]) == 2
    assert "train.max_steps" in capsys.readouterr().err  # the loader's did-you-mean names the key
    # 2 processes with backend none would be two independent runs writing one folder
    assert cli_main(["launch", "slurm", *base, "--nproc-per-node", "2", "--dry-run"]) == 2
    assert "distributed.backend" in capsys.readouterr().err
    assert not run_dir.exists()


# ------------------------------------------------------------ the batch script's logic, stand-in Slurm
@pytest.fixture
def fake_slurm(tmp_path):
    """A bin folder with srun/scontrol stand-ins: srun runs its command locally, scontrol logs requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    _stub(bin_dir, "scontrol", f'if [ "$1 $2" = "show hostnames" ]; then echo node0; else echo "$@" >> {log}; fi\n')
    # srun: run the step command (drop srun's own options), like one node; signals go to the step
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n"$@" & pid=$!\n'
          'trap "kill -USR2 $pid" USR2\ntrap "kill -TERM $pid" TERM\n'
          'while true; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || exit $rc; done\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "node0", "SLURM_NODEID": "0"}
    return env, log


def _batch_script(tmp_path: Path, worker: str) -> Path:
    """The real template, with the training command replaced by `worker` (python code) via a fake python."""
    fake_python = tmp_path / "fakepython"
    fake_python.write_text(f"#!{PY}\n{worker}")
    fake_python.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(SlurmJob(), ["recipe.yaml"], python=str(fake_python)))
    return script


@pytest.mark.parametrize("code,expect_rc,requeued", [(0, 0, False), (75, 0, True), (76, 0, True), (2, 2, False),
                                                     (3, 3, False), (4, 4, False), (1, 1, False)])
def test_batch_script_exit_codes(tmp_path, fake_slurm, code, expect_rc, requeued):
    env, log = fake_slurm
    script = _batch_script(tmp_path, f"import sys\nsys.exit({code})\n")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == expect_rc, done.stdout + done.stderr
    assert (log.read_text().split() == ["requeue", "77"]) if requeued else not log.exists()
    assert f"training step exited with {code}" in done.stdout


def test_batch_script_gives_up_infra_retries(tmp_path, fake_slurm):
    env, log = fake_slurm
    script = _batch_script(tmp_path, "import sys\nsys.exit(76)\n")
    done = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "3"}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 76 and not log.exists() and "giving up" in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_batch_script_forwards_signal_requeues_on_usr2_only(tmp_path, fake_slurm, sig):
    env, log = fake_slurm
    started = tmp_path / "started"
    # a "trainer" that exits 75 once it sees the signal, as the real one does after its save
    worker = ("import signal, sys, time, pathlib\ngot = []\n"
              "signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))\n"
              # as the trainer does: SIGTERM (which torchrun's agent sends to the others once one worker has
              # exited) only sets the flag, so a rank still saving is not killed halfway
              "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
              "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
              f"pathlib.Path({str(started)!r}).touch()\n"
              "for _ in range(600):\n    time.sleep(0.05)\n    if got:\n        print('worker got', got, flush=True)\n"
              "        sys.exit(75)\nsys.exit(9)\n")
    script = _batch_script(tmp_path, worker)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)  # what `--signal=B:USR2@...` does: the batch shell only
    out, _ = proc.communicate(timeout=60)
    assert f"worker got [{int(sig)}]" in out and f"got SIG{sig.name.removeprefix('SIG')}" in out
    if sig == signal.SIGUSR2:  # our lead-time signal: save, requeue, done
        assert proc.returncode == 0 and log.read_text().split() == ["requeue", "77"], out
    else:  # scancel or the time limit: save, but Slurm decides; a requeue would undo a user's scancel
        assert proc.returncode == 75 and not log.exists() and "not requeueing" in out, out


# ------------------------------------------------------------ torchrun wrapper
def _torchrun(tmp_path: Path, worker: str, *extra: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(worker)
    return subprocess.Popen([PY, "-m", "surgsigma_train.launch.torchrun", "--standalone", "--nproc-per-node=2",
                             *extra, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_exit_code_of_signals():
    assert exit_code_of(75) == 75 and exit_code_of(-15) == 143 and exit_code_of(0) == 0


def test_torchrun_wrapper_passes_worker_exit_code(tmp_path):
    # plain torchrun would exit 1 here; a launcher must see the 3 (bad data: never retry)
    proc = _torchrun(tmp_path, "import os, sys, time\ntime.sleep(0.2 * int(os.environ['RANK']))\nsys.exit(3)\n")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out


def test_torchrun_wrapper_forwards_usr2_to_workers(tmp_path):
    ready, saved = tmp_path / "ready", tmp_path / "saved"  # files, not prints: two workers' prints interleave
    worker = ("import os, signal, sys, time, pathlib\ngot = []\n"
              "signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))\n"
              # as the trainer does: SIGTERM (which torchrun's agent sends to the others once one worker has
              # exited) only sets the flag, so a rank still saving is not killed halfway
              "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
              f"pathlib.Path({str(ready)!r} + os.environ['RANK']).touch()\n"
              "for _ in range(1200):\n    time.sleep(0.05)\n    if got:\n"
              "        time.sleep(1.0)  # a save that outlives the agent's reaction to a plain signal\n"
              f"        pathlib.Path({str(saved)!r} + os.environ['RANK']).touch()\n        sys.exit(75)\nsys.exit(9)\n")
    proc = _torchrun(tmp_path, worker)
    deadline = time.monotonic() + 60
    while not all(Path(f"{ready}{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(child_pids(proc.pid)) == 2  # the agent's children are exactly the workers
    proc.send_signal(signal.SIGUSR2)  # only the agent: it must pass it on, not die
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert Path(f"{saved}0").exists() and Path(f"{saved}1").exists(), out


def test_torchrun_sh_needs_master_addr_for_many_nodes(tmp_path):
    done = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "recipe.yaml"], capture_output=True,
                          text=True, env={**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "PYTHON": PY})
    assert done.returncode == 2 and "MASTER_ADDR" in done.stderr


def test_torchrun_sh_passes_config_error_through(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: {family: qwen2_5_vl}\ndata: {train: [{path: x.json}]}\noutput: {dir: out}\ntrain: {lr: -1}\n")
    done = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "NPROC_PER_NODE": "2", "PYTHON": PY, "OMP_NUM_THREADS": "1"},
                          timeout=180)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "train.lr" in done.stderr
