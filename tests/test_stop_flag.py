"""The checkpoint-and-stop flag of a run: real signals to this process, no training (the
training-level proof is tests/test_resume.py)."""

from __future__ import annotations

import os
import signal

from tunefleet.distributed.trainer import StopFlag


def test_a_signal_sets_the_flag_and_the_handlers_before_come_back() -> None:
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR1, lambda signum, _frame: seen.append(signum))
    term_before = signal.getsignal(signal.SIGTERM)
    try:
        flag = StopFlag()
        with flag:
            assert not flag.raised
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
            assert flag.raised and flag.signal == signal.SIGUSR1
        assert seen == []  # the flag took it, not the handler it replaced
        assert signal.getsignal(signal.SIGTERM) is term_before
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # the handler before is back
    finally:
        signal.signal(signal.SIGUSR1, before)
