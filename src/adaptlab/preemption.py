"""Preemption: SIGTERM or SIGUSR1 ends a run at the next step boundary, with a checkpoint at that step.

SLURM sends SIGTERM at preemption, at ``scancel`` and at the time limit (SIGKILL follows ``KillWait`` seconds
later), and profiles/slurm asks for SIGTERM 3 minutes before the time limit (``--signal=TERM@180``; SIGUSR1 is
handled the same way for sites that send that as their warning). The handler
only records the signal; the training loop checks it after each step, writes a checkpoint at that step and raises
``Preempted``. The job's script exits with ``EXIT_PREEMPTED`` and no records, so Snakemake retries the job and
the retry resumes from the checkpoint (same config id), ending with the summary an uninterrupted run writes.

Written by hand: a few lines over ``signal``; no library does this for a plain training loop.
"""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later

_received: list[str] = []


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint at ``step``; a retry resumes there."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint written, a retry resumes from it")
        self.signal_name, self.step = signal_name, step


def requested() -> str | None:
    """The name of the first stop signal received since ``watch`` began, or None."""
    return _received[0] if _received else None


def _handler(signum, _frame) -> None:
    _received.append(signal.Signals(signum).name)


@contextlib.contextmanager
def watch():
    """Inside the block, SIGTERM and SIGUSR1 are recorded instead of ending the process (main thread only; in
    other threads, e.g. under a test runner, this is a no-op and signals keep their default action)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()
