"""A run directory's guarantees: one writer at a time, and finished records that survive their job's failure.

**One writer.** ``execute`` holds an exclusive ``flock`` on ``<run>/run.lock`` while it trains. A second process
for the same run (a job resubmitted by a restarted controller while the orphaned job of the killed one still
trains) waits for the lock instead of writing beside it, then finds the finished records and keeps them. The lock
is the kernel's: it goes away with its process, however that process ends. On a cluster file system it needs
``flock`` support (NFSv4, Lustre mounted with ``-o flock``, GPFS, BeeGFS).

**Finished records are kept.** When a run's records are written they are also hard-linked (no copy, no extra
space) into ``<run>/.finished/`` with a key: the run's config, its code fingerprint and, for each input file
(backbone weights, dataset), its size and the sha256 of its content. Snakemake removes the outputs of every member
of a failed, cancelled or timed-out group job, including members that had finished, and of every member of a pack
it reruns because one member changed (adaptlab.packs); when the job reaches such a run, ``restore`` links its
records back instead of training it again. A changed config, changed code or an input whose content
changed (sha256) changes the key, and the run trains. ``rm -r <run>/.finished`` forces a run to train again.

Written by hand: ``fcntl.flock``, ``os.link`` and ``hashlib.file_digest``; nothing more is needed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq

LOCK_NAME = "run.lock"
FINISHED_DIR = ".finished"
KEY_NAME = "key.json"
NOT_RECORDS = {"ckpt.safetensors", "running.json", LOCK_NAME, "job.log"}  # state of a live run, not its records


@contextlib.contextmanager
def exclusive(out_dir: Path):
    """Hold ``<out_dir>/run.lock``; when another process holds it, say who (its ``running.json``) and wait."""
    with open(out_dir / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            marker = out_dir / "running.json"
            holder = marker.read_text() if marker.exists() else "unknown process"
            print(f"run directory {out_dir} is locked by another process ({holder}); waiting for it to finish",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, per process: a pack hashes a shared input once


def _digest(path: str, st: os.stat_result) -> str:
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _DIGESTS[key]


def input_identity(paths) -> list[list]:
    """(path, size, sha256 of the content) of each input file: a rewrite with the same bytes (a backbone trained
    again to the same weights, a dataset prepared again) is the same input, any other change is not."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([str(p), st.st_size, _digest(str(p), st)])
        except OSError:  # missing: the run itself reports it, naming the path
            out.append([str(p), None, None])
    return out


def record_key(config_json: str, code_fingerprint: str | None, inputs) -> str:
    blob = json.dumps({"config": config_json, "code": code_fingerprint, "inputs": input_identity(inputs)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def keep(out_dir: Path, key: str) -> None:
    """Hard-link the run's record files into ``.finished/`` under ``key`` (replacing what was kept before)."""
    kept = out_dir / FINISHED_DIR
    kept.mkdir(exist_ok=True)
    for old in kept.iterdir():
        old.unlink()
    names = sorted(p.name for p in out_dir.iterdir()
                   if p.is_file() and p.name not in NOT_RECORDS and not p.name.endswith(".tmp"))
    for name in names:
        os.link(out_dir / name, kept / name)
    (kept / KEY_NAME).write_text(json.dumps({"key": key, "files": names}))


def _readable(path: Path) -> bool:
    """A kept file exists and, if Parquet, its footer reads (a file damaged in place is not restored)."""
    if not path.is_file():
        return False
    if path.suffix != ".parquet":
        return True
    try:
        pq.ParquetFile(path).read()
        return True
    except Exception:  # noqa: BLE001 - any unreadable file: train again
        return False


def restore(out_dir: Path, key: str) -> list[str] | None:
    """Link the kept records back when they were kept under ``key``; the names restored, or None."""
    kept = out_dir / FINISHED_DIR
    try:
        meta = json.loads((kept / KEY_NAME).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or not all(_readable(kept / n) for n in meta["files"]):
        return None
    for name in meta["files"]:
        target, tmp = out_dir / name, out_dir / f".{name}.restore"
        tmp.unlink(missing_ok=True)
        os.link(kept / name, tmp)
        os.replace(tmp, target)
    print(f"{out_dir}: records of this exact run (config, code, inputs) kept from an earlier job; restored, "
          f"not retrained ({', '.join(meta['files'])})", file=sys.stderr)
    return meta["files"]
