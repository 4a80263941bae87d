"""`python -m surgsigma_train.launch.torchrun [torchrun options] -m surgsigma_train.cli train ...`

torchrun itself, with two changes a batch scheduler needs:

- Exit code: plain torchrun exits 1 whatever its workers did, so a launcher could not tell a
  preemption (75: requeue) from a bad recipe (2: never retry). Here the exit code is the first
  failed worker's (a worker killed by signal S gives 128+S, as in a shell).
- SIGUSR2 and SIGTERM are forwarded to the workers and the agent keeps waiting for them: the workers
  save a checkpoint and exit 75 on their own. Plain torchrun dies on SIGUSR2 (default action) and
  on SIGTERM gives its workers `--shutdown-timeout` seconds before SIGKILL, too little for a save.
  Under Slurm every process of a step may receive the signal directly too; the trainer treats a
  repeated signal as the same request.
"""

from __future__ import annotations

import os
import signal
import sys

FORWARDED = (signal.SIGUSR2, signal.SIGTERM)


def child_pids(parent: int | None = None) -> list[int]:
    """Direct children of `parent` (default: this process), read from /proc (workers, no threads)."""
    want = str(parent or os.getpid())
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:  # exited while we looked
            continue
        # the command name may hold spaces and ')': the fields after it start at the last ')'
        if stat.rsplit(")", 1)[-1].split()[1] == want:
            found.append(int(entry.name))
    return found


def _forward(signum: int, _frame) -> None:
    for pid in child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def exit_code_of(exitcode: int) -> int:
    """A worker's exit status as a shell reports it: negative (killed by signal S) -> 128+S."""
    return exitcode if exitcode >= 0 else 128 - exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if hasattr(args, "signals_to_handle"):  # torch >= 2.7: keep torchrun's handlers off the signals we forward
        names = {s.name for s in FORWARDED}
        args.signals_to_handle = ",".join(s for s in args.signals_to_handle.split(",") if s.strip() not in names)
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(exc.format_msg(), file=sys.stderr)
        code = exit_code_of(failure.exitcode)
        print(f"torchrun: first failure rank {rank}: exit code {code}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
