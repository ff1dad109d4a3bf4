"""Each expected run's state, read from its files: ok / stale / failed / diverged / missing / corrupt / running.

- ``ok``, ``failed``, ``diverged``: the status its ``summary.parquet`` records.
- ``stale``: recorded ``ok``, but the code it recorded (``code_modules``) differs from the code now; the detail
  names the modules that changed (``adaptlab.fingerprint``). A failed or diverged run keeps its status and says
  in its detail that its code changed.
- ``corrupt``: one of its Parquet files (summary, steps or a study's raw table) cannot be read or lacks the
  columns the tables need; the detail names the file and the reader's message. Aggregation leaves the run out,
  moves its records to ``<run dir>/corrupt/`` (nothing is deleted) and the next ``snakemake`` reruns it.
- ``running``: no summary yet, and ``running.json`` (written by ``runner.execute`` while a run trains) names a
  live process on this host, or another host (a cluster node this machine cannot see into).
- ``missing``: no records (never run, or cut off: a run killed mid-way resumes from its checkpoint).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from adaptlab.records import RUNNING_NAME

STATES = ("ok", "stale", "failed", "diverged", "missing", "corrupt", "running")
QUARANTINE_DIR = "corrupt"
# the columns a record file must have (with these types) for the tables to use it
REQUIRED = {"summary": {"run_id": pa.string(), "status": pa.string(), "kind": pa.string()},
            "steps": {"run_id": pa.string(), "step": pa.int64()}}


@dataclass
class RunState:
    run_id: str
    study: str
    state: str
    detail: str | None = None
    files: dict[str, Path] = field(default_factory=dict)  # record name -> a readable file the tables may load


def _compatible(found: pa.DataType, wanted: pa.DataType) -> bool:
    if found == wanted or pa.types.is_null(found):
        return True
    numeric = (pa.types.is_integer, pa.types.is_floating)
    return any(f(found) for f in numeric) and any(f(wanted) for f in numeric)


def check_file(path: Path, required: dict[str, pa.DataType]) -> tuple[pa.Table | None, str | None]:
    """Read a record file whole; (table, None) if usable, (None, message) if unreadable or schema-broken."""
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - any reader error makes the file corrupt, whatever its kind
        message = str(err).replace(f"Could not open Parquet input source '{path}': ", "")  # the path is said once
        return None, f"{type(err).__name__}: {message}"
    for name, wanted in required.items():
        if name not in table.schema.names:
            return None, f"no column {name!r}"
        found = table.schema.field(name).type
        if not _compatible(found, wanted):
            return None, f"column {name!r} has type {found}, expected {wanted}"
    return table, None


def running_marker(run_dir: Path) -> dict | None:
    """The marker of a run in progress, if it names a live process (on this host) or another host."""
    try:
        marker = json.loads((run_dir / RUNNING_NAME).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("host") != socket.gethostname():
        return marker
    try:
        os.kill(int(marker["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return None  # its process is gone: the run was cut off
    return marker


def run_state(run_dir: Path, run_id: str, study: str, raw_required: dict[str, dict[str, pa.DataType]]) -> RunState:
    from adaptlab.fingerprint import changed_modules

    names = {**REQUIRED, **raw_required}
    st = RunState(run_id, study, "missing")
    corrupt = []
    for name, required in names.items():
        path = run_dir / f"{name}.parquet"
        if not path.is_file():
            continue
        table, err = check_file(path, required)
        if err:
            corrupt.append(f"{path}: {err}")
        else:
            st.files[name] = path
            if name == "summary":
                if table.num_rows != 1:
                    corrupt.append(f"{path}: {table.num_rows} rows, expected 1")
                    st.files.pop(name)
                else:
                    row = table.to_pylist()[0]
    if corrupt:
        st.state, st.detail, st.files = "corrupt", "; ".join(corrupt), {}
        return st
    if "summary" not in st.files:
        marker = running_marker(run_dir)
        if marker:
            st.state = "running"
            st.detail = f"host {marker.get('host')} pid {marker.get('pid')}" + (
                f" job {marker['slurm_job_id']}" if marker.get("slurm_job_id") else "")
        st.files = {}  # steps/raw files without a summary are left-overs of an earlier attempt
        return st
    st.state = row["status"]
    st.study = st.study or row.get("study") or ""
    if "code_modules" not in row or row["code_modules"] is None:
        changed = ["(no code fingerprint recorded: an older adaptlab)"]
    else:
        changed = changed_modules(json.loads(row["code_modules"]))
    if changed:
        if st.state == "ok":
            st.state, st.detail = "stale", "code changed: " + ", ".join(changed)
        else:
            st.detail = "code changed since: " + ", ".join(changed)
    if marker := running_marker(run_dir):  # a rerun is training over these records
        st.state, st.detail = "running", f"host {marker.get('host')} pid {marker.get('pid')}"
    return st


def raw_requirements() -> dict[str, dict[str, pa.DataType]]:
    """For each study raw table: the columns a file must have (its non-nullable ones and run_id)."""
    from adaptlab.aggregate import raw_tables

    out = {}
    for name, schema in raw_tables().items():
        out[name] = {f.name: f.type for f in schema if not f.nullable or f.name == "run_id"}
    return out


def run_states(results_dir: str | Path, expected: dict[str, str] | list[str]) -> list[RunState]:
    """The state of every expected run (``expected``: run id -> study, or run ids), in the order given."""
    if not isinstance(expected, dict):
        expected = dict.fromkeys(expected, "")
    runs = Path(results_dir) / "runs"
    raw = raw_requirements()
    return [run_state(runs / rid, rid, study, raw) for rid, study in expected.items()]


def quarantine(run_dir: Path) -> Path:
    """Move a corrupt run's record files (every ``*.parquet``) to ``<run dir>/corrupt/<time>/``, so that its summary
    is missing and the next ``snakemake`` reruns it; nothing is deleted. Returns the quarantine directory."""
    dest = run_dir / QUARANTINE_DIR / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for path in run_dir.glob("*.parquet"):
        shutil.move(str(path), dest / path.name)
    return dest


def quarantine_events(results_dir: str | Path, run_ids) -> list[str]:
    """``<run id>/<time>`` of every quarantine so far. The aggregate rule's params: a new one reruns the
    aggregation, hence the quarantined runs (Snakemake does not recreate the missing inputs of an up-to-date job)."""
    runs = Path(results_dir) / "runs"
    events = []
    for rid in run_ids:
        qdir = runs / rid / QUARANTINE_DIR
        if qdir.is_dir():
            events += [f"{rid}/{d.name}" for d in sorted(qdir.iterdir())]
    return events


def counts(states: list[RunState]) -> dict[str, dict[str, int]]:
    """study -> state -> number of runs (every state present, zeros included)."""
    out: dict[str, dict[str, int]] = {}
    for st in states:
        out.setdefault(st.study, dict.fromkeys(STATES, 0))[st.state] += 1
    return out
