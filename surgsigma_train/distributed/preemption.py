"""SIGUSR2 / SIGTERM -> a flag; the loop agrees on it across ranks after each optimizer step.

Slurm sends SIGUSR2 ahead of the time limit (`#SBATCH --signal=B:USR2@...`) and SIGTERM on
preemption; SIGUSR1 is left alone (NCCL uses it). The handler only sets a flag: saving from inside
a signal handler could interleave with a collective and hang every rank.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():  # signal() only works there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """This rank saw a signal (each rank's local view; the trainer all-reduces it)."""
        return self._event.is_set()
