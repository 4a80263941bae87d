"""The signal handler only sets a flag; the previous handlers come back on uninstall."""

import os
import signal

import pytest

from surgsigma_train.distributed.preemption import PreemptionFlag


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_signal_sets_flag_and_uninstall_restores(sig):
    before = signal.getsignal(sig)
    flag = PreemptionFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), sig)  # delivered to the main thread before kill() returns to Python code
        assert flag.requested and flag.signal_name == signal.Signals(sig).name
    finally:
        flag.uninstall()
    assert signal.getsignal(sig) == before
