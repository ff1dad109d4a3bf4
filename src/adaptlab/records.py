"""The Parquet schemas of a run: the one place that defines what a run record holds.

``summary.parquet``: one row per run (identity, status, selection and test metrics, cost, provenance, and
the run's full config as JSON). ``steps.parquet``: one row per optimizer step (loss, lr, pre-clip grad
norm) with the validation metrics filled at eval steps. Studies append their own summary columns with
``extra_fields``; DuckDB reads all summaries with ``union_by_name``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STATUSES = ("ok", "diverged", "failed")
RUNNING_NAME = "running.json"  # in a run's directory while a process trains it (``adaptlab.run_state``)

SUMMARY_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("kind", pa.string()),  # pretrain | finetune (the core grids) | a study's own kind of run
    pa.field("study", pa.string()),
    pa.field("backbone", pa.string()),
    pa.field("grid", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("lr", pa.float64()),
    pa.field("optimizer", pa.string()),
    pa.field("trainable", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("best_val_acc", pa.float64()),
    pa.field("best_val_loss", pa.float64()),
    pa.field("best_step", pa.int64()),
    pa.field("test_acc", pa.float64()),
    pa.field("test_loss", pa.float64()),
    pa.field("final_loss", pa.float64()),
    pa.field("steps_done", pa.int64()),
    pa.field("steps_planned", pa.int64()),
    pa.field("resumed_from", pa.int64()),
    pa.field("trainable_params", pa.int64()),
    pa.field("total_params", pa.int64()),
    pa.field("wall_seconds", pa.float64()),
    pa.field("steps_per_s", pa.float64()),
    pa.field("peak_rss_mb", pa.float64()),
    pa.field("peak_gpu_mem_mb", pa.float64()),
    pa.field("device", pa.string()),
    pa.field("adaptlab_version", pa.string()),
    pa.field("torch_version", pa.string()),
    # provenance (``provenance()``): the code and the machine that produced the run
    pa.field("git_commit", pa.string()),  # the commit of the adaptlab checkout, or "no git"
    pa.field("git_dirty", pa.bool_()),  # tracked files modified at run time (null without git)
    pa.field("code_fingerprint", pa.string()),  # adaptlab.fingerprint over the code this kind of run executes
    pa.field("code_modules", pa.string()),  # JSON {module: code hash}: what run_status compares to find stale runs
    pa.field("timm_version", pa.string()),
    pa.field("peft_version", pa.string()),
    pa.field("snakemake_version", pa.string()),
    pa.field("device_name", pa.string()),  # e.g. "NVIDIA H200", or the CPU model
    pa.field("hostname", pa.string()),
    pa.field("slurm_job_id", pa.string()),  # SLURM_JOB_ID (array jobs: <job>_<task>), null outside SLURM
    pa.field("config_json", pa.string()),
]
SUMMARY_SCHEMA = pa.schema(SUMMARY_FIELDS)

# Metrics that vary with the machine and the moment, not with the config and seed.
TIMING_COLUMNS = ("wall_seconds", "steps_per_s", "peak_rss_mb", "peak_gpu_mem_mb", "resumed_from")
# What differs between machines and checkouts for the same config and seed (not part of a run's results).
PROVENANCE_COLUMNS = ("git_commit", "git_dirty", "code_fingerprint", "code_modules", "timm_version", "peft_version",
                      "snakemake_version", "device_name", "hostname", "slurm_job_id")

STEPS_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("loss", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("grad_norm", pa.float64()),
]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout adaptlab runs from; ("no git", None) outside one or without git."""
    from adaptlab.fingerprint import ROOT

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "no git", None
    return commit, dirty


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(kind: str, study: str | None, device_name: str) -> dict:
    """The provenance columns of a run of ``kind`` (``PROVENANCE_COLUMNS``), for its summary row."""
    from adaptlab.fingerprint import entry_module, fingerprint, module_hashes

    commit, dirty = git_state()
    hashes = module_hashes(entry_module(kind, study))
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"git_commit": commit, "git_dirty": dirty, "code_fingerprint": fingerprint(hashes),
            "code_modules": json.dumps(hashes, sort_keys=True), "timm_version": _version("timm"),
            "peft_version": _version("peft"), "snakemake_version": _version("snakemake"),
            "device_name": device_name, "hostname": socket.gethostname(), "slurm_job_id": job}


def summary_schema(extra_fields: list[pa.Field] | None = None) -> pa.Schema:
    return pa.schema(SUMMARY_FIELDS + list(extra_fields or []))


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write(table: pa.Table, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write any per-run Parquet table (e.g. a study's raw table) atomically: a killed job leaves no half file."""
    _write(table, path)


def write_summary(path: str | Path, row: dict, extra_fields: list[pa.Field] | None = None) -> pa.Table:
    """Write the one-row summary; every schema column must be given (None for unknown), nothing else."""
    schema = summary_schema(extra_fields)
    missing = [f.name for f in schema if f.name not in row]
    unknown = [k for k in row if k not in schema.names]
    if missing or unknown:
        raise ValueError(f"summary row: missing columns {missing}, unknown columns {unknown}")
    if row["status"] not in STATUSES:
        raise ValueError(f"summary row: status must be one of {STATUSES}, got {row['status']!r}")
    table = pa.Table.from_pylist([{k: _clean(row[k]) for k in schema.names}], schema=schema)
    _write(table, path)
    return table


def write_run(out_dir: str | Path, row: dict, log: dict | None = None,
              extra_fields: list[pa.Field] | None = None) -> dict:
    """Write a run's records: ``steps.parquet`` (its log; the callers pass none for a failed run, so it is
    empty), then ``summary.parquet``. A failed run's study columns it never reached are null. Returns ``row``."""
    if row["status"] == "failed":
        for f in extra_fields or []:
            row.setdefault(f.name, None)
    write_steps(Path(out_dir) / "steps.parquet", row["run_id"], log or {})
    write_summary(Path(out_dir) / "summary.parquet", row, extra_fields=extra_fields)
    return row


def steps_schema(log_columns) -> pa.Schema:
    base = {f.name for f in STEPS_FIELDS}
    extra = [pa.field(c, pa.float64()) for c in log_columns if c not in base]
    return pa.schema(STEPS_FIELDS + extra)


def write_steps(path: str | Path, run_id: str, log: dict[str, list[float]]) -> pa.Table:
    """Write the per-step log; ``val_*`` columns are null except at eval steps."""
    schema = steps_schema(log)
    n = len(log.get("step", []))
    cols = {"run_id": [run_id] * n, "step": [int(s) for s in log.get("step", [])]}
    for f in schema:
        if f.name not in cols:
            cols[f.name] = [_clean(float(v)) for v in log.get(f.name, [math.nan] * n)]
    table = pa.Table.from_pydict(cols, schema=schema)
    _write(table, path)
    return table


def recorded_fingerprint(path: str | Path) -> str | None:
    """The ``code_fingerprint`` a summary recorded; None when there is no readable summary or it has none."""
    try:
        table = pq.ParquetFile(path).read(columns=["code_fingerprint"])
        return table.column(0)[0].as_py()
    except Exception:  # noqa: BLE001 - absent, corrupt or older records: no fingerprint to keep
        return None


def read_summary(path: str | Path) -> dict:
    return pq.read_table(path).to_pylist()[0]
