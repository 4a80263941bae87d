"""`surgsigma-train launch slurm`: the batch script for a recipe, written into its run folder, submitted.

The script comes from one template (template.sbatch, next to this file). `launch/slurm/train.sbatch`
in the repository is the same template rendered generically (recipe and overrides as the script's
arguments); a test keeps the two identical.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from surgsigma_train.config.loading import dump_recipe, load_recipe
from surgsigma_train.errors import ConfigError, UserError

TEMPLATE = Path(__file__).with_name("template.sbatch")
GENERIC_USAGE = """\
# Usage: sbatch [--nodes=N] [--gpus-per-node=G] [--time=...] launch/slurm/train.sbatch RECIPE [key.sub=value ...]
# The run's folder is the recipe's output.dir; the log is slurm-JOBID.out (appended across requeues).
# NPROC_PER_NODE (default: the GPUs Slurm gives each node, else 1) and SURGSIGMA_PYTHON (default:
# python3 on PATH) come from the submitting environment (sbatch exports it)."""


class SlurmError(UserError):
    """sbatch is missing or refused the job (exit code 1)."""


@dataclass
class SlurmJob:
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "surgsigma"
    signal_lead_s: int = 300  # seconds before the time limit that SIGUSR2 asks the run to save
    output: str = "slurm-%j.out"
    chdir: str | None = None
    extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. --qos=high

    def header(self) -> list[str]:
        opts = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", "--ntasks-per-node=1"]
        if self.gpus_per_node:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        for name in ("cpus_per_task", "partition", "time", "account", "chdir"):
            if getattr(self, name) is not None:
                opts.append(f"--{name.replace('_', '-')}={getattr(self, name)}")
        opts += [f"--signal=B:USR2@{self.signal_lead_s}", "--requeue", "--open-mode=append",
                 f"--output={self.output}", *self.extra]
        return [f"#SBATCH {o}" for o in opts]


def render_sbatch(job: SlurmJob, train_args: list[str] | None, python: str = "python3", usage: str = "") -> str:
    """The batch script; `train_args` None = the script's own arguments ("$@") name recipe and overrides."""
    nproc = job.nproc_per_node or job.gpus_per_node or 1
    values = {
        "SBATCH_HEADER": "\n".join(job.header()),
        "USAGE": usage,
        "PYTHON": python,
        "NPROC": str(nproc),
        "TRAIN_ARGS": '"$@"' if train_args is None else " ".join(shlex.quote(a) for a in train_args),
    }
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    assert not left, f"template placeholders not filled: {left}"
    return text


def render_generic() -> str:
    """What launch/slurm/train.sbatch holds."""
    return render_sbatch(SlurmJob(), None, usage=GENERIC_USAGE)


def prepare_launch(recipe: str, overrides: list[str], job: SlurmJob) -> tuple[Path, Path]:
    """Validate the recipe, write `<output.dir>/launch/{recipe.yaml,train.sbatch}`; returns both paths.

    The recipe is written resolved (overrides applied, defaults filled in) so that every requeued run
    reads exactly what was validated here, whatever happens to the original file meanwhile.
    """
    cfg = load_recipe(recipe, overrides)  # ConfigError (exit 2) before anything is written
    if cfg.distributed.backend == "none" and job.nodes * (job.nproc_per_node or job.gpus_per_node or 1) > 1:
        raise ConfigError(f"{job.nodes} node(s) x {job.nproc_per_node or job.gpus_per_node} processes need "
                          "distributed.backend (ddp, fsdp2 or deepspeed), the recipe has none")
    launch_dir = Path(cfg.output.dir).resolve() / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = launch_dir / "recipe.yaml"
    recipe_path.write_text(dump_recipe(cfg), encoding="utf-8")
    if job.job_name == SlurmJob.job_name:  # the run folder's name tells jobs apart in squeue
        job.job_name = f"surgsigma-{launch_dir.parent.name}"
    job.chdir = job.chdir or str(Path.cwd())  # relative paths in the recipe are relative to where you launch
    job.output = str(launch_dir / "slurm-%j.out")
    usage = f"# Written by `surgsigma-train launch slurm {shlex.join([recipe, *overrides])}`; submit with sbatch."
    script = launch_dir / "train.sbatch"
    script.write_text(render_sbatch(job, [str(recipe_path)], python=sys.executable, usage=usage), encoding="utf-8")
    script.chmod(0o755)
    return recipe_path, script


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    if shutil.which("sbatch") is None:
        raise SlurmError(f"sbatch not found on PATH; submit {script} from a Slurm login node")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]  # --parsable: "jobid" or "jobid;cluster"
