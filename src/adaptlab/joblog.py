"""A job's log file: what the job prints, and the traceback of a failure, kept next to its records.

Snakemake's ``log:`` names the file but does not fill it for ``script:`` rules, and the SLURM plugin deletes
its own log of a job that succeeds; this tees the job's stdout and stderr into the file, so a failed run's
traceback stays in the run directory on a laptop and on a cluster.
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path


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
def job_log(path: str | Path):
    """Inside the block, stdout and stderr also go to ``path`` (rewritten); an exception's traceback is written
    there before it propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as fh, contextlib.redirect_stdout(_Tee(sys.stdout, fh)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, fh)):
        try:
            yield
        except BaseException:
            fh.write(traceback.format_exc())
            raise
