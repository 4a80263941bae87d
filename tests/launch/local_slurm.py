"""A throwaway one-node Slurm cluster for tests: munged, slurmctld and slurmd on localhost, as root.

Everything (key, sockets, state, spool, logs) lives under one folder; the daemons run in the foreground
as children of the test process so that they are stopped by pid, and nothing outside the folder is
touched except the apt install of the packages when they are missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]


class SlurmUnavailable(RuntimeError):
    """apt itself is not available (not root, no apt-get): the only reason a slurm test may skip."""


def sbin(name: str) -> str | None:
    """A daemon's path: the sbin folders may be missing from a CI PATH."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin:/usr/bin")


def ensure_installed() -> None:
    if sbin("slurmctld") and sbin("slurmd") and sbin("munged"):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise SlurmUnavailable("slurmctld is missing and apt-get cannot install it here (needs apt-get and root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:  # apt exists: a failure here is a real error, not a reason to skip
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalSlurm:
    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 2)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, scontrol, scancel) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "LocalSlurm":
        r = self.root
        for sub in ("state", "spool", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.sock"
        conf = f"""\
ClusterName=surgsigmatest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SwitchType=switch/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        # A requeued job becomes eligible only when the credential lifetime (cred_expire, default 120 s)
        # has passed and starts at the next periodic scheduling pass (sched_interval, default 60 s):
        # 10 s and 2 s keep the requeue test short.
        self.conf.write_text(conf)
        self._spawn([sbin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'munge' / 'munged.log'}",
                     f"--seed-file={r / 'munge' / 'munged.seed'}"], "munged")
        self._wait(lambda: sock.exists(), "munged socket", r / "munge" / "munged.log")
        self._spawn([sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
                   "slurmctld", r / "slurmctld.log")
        self._spawn([sbin("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd")
        self._wait(lambda: "idle" in self._out(["sinfo", "-h", "-o", "%t"]), "slurmd (node idle)", r / "slurmd.log")
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = (self.root / f"{name}.stdout").open("w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _out(self, cmd: list[str]) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True).stdout

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def _wait(self, ready, what: str, log: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}; "
                                       f"log {log}:\n{log.read_text()[-3000:] if log.exists() else ''}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s; log {log}:\n"
                           f"{log.read_text()[-3000:] if log.exists() else ''}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started, by pid."""
        if self.procs and all(p.poll() is None for p in self.procs):
            # slurmstepd and the job's processes outlive slurmd: end the jobs first, SIGKILL if they linger
            for cancel in (["scancel"], ["scancel", "--signal=KILL", "--full"]):
                jobs = self._out(["squeue", "-h", "-o", "%i"]).split()
                if not jobs:
                    break
                self.run(*cancel, *jobs, check=False)
                deadline = time.monotonic() + 30
                while self._out(["squeue", "-h", "-o", "%i"]).split() and time.monotonic() < deadline:
                    time.sleep(1)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    # ----------------------------------------------------------- job helpers
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)
