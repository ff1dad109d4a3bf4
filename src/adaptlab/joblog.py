"""A job's log file: what the job prints, and the traceback of a failure, kept next to its records.

Snakemake's ``log:`` names the file but does not fill it for ``script:`` rules, and the SLURM plugin deletes
its own log of a job that succeeds; this tees the job's stdout and stderr into the file, so a failed run's
traceback stays in the run directory on a laptop and on a cluster.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from adaptlab.preemption import EXIT_PREEMPTED, Preempted


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def job_log(*paths: str | Path):
    """Inside the block, stdout and stderr also go to each of ``paths`` (one per run; several for the runs of a
    fused pack) after a header naming host, pid and SLURM job (Snakemake removes the file before it reruns a job; a
    stopped attempt's last words stay in its SLURM log, which the plugin keeps for failed jobs); an exception's
    traceback is written there before it propagates. A run stopped by SIGTERM/SIGUSR1 (``Preempted``) exits with
    ``EXIT_PREEMPTED``."""
    with contextlib.ExitStack() as stack:
        files = []
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(stack.enter_context(open(path, "a", buffering=1)))
        tee = _Tee(*files)
        stack.enter_context(contextlib.redirect_stdout(_Tee(sys.stdout, tee)))
        stack.enter_context(contextlib.redirect_stderr(_Tee(sys.stderr, tee)))
        tee.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} host {socket.gethostname()} pid {os.getpid()}"
                  f" SLURM job {os.environ.get('SLURM_JOB_ID', '-')} ===\n")
        try:
            yield
        except Preempted as stop:  # a retry resumes from the checkpoint: exit with the code that says so
            tee.write(f"{stop}\n")
            print(f"adaptlab: {stop}", file=sys.__stderr__)
            raise SystemExit(EXIT_PREEMPTED) from None
        except BaseException:
            tee.write(traceback.format_exc())
            raise
