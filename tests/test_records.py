"""Records you can trust: provenance in every summary; stale runs after a code edit (not after a comment edit),
listed and, with ``rerun_on_code_change``, rerun exactly; corrupt record files that do not block aggregation
and are rerun by the next ``snakemake``; a killed pipeline finished by the same command, resuming its runs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from adaptlab import fingerprint
from adaptlab.config import load_config
from adaptlab.records import PROVENANCE_COLUMNS
from adaptlab.studies import STUDIES, expected_runs
from conftest import REPO, copy_workflow, planned_jobs, snakemake

KINDS = [("finetune", None)] + [("run", s) for s in STUDIES]


def _edit(path: Path, text: str) -> None:
    st = path.stat()
    path.write_text(path.read_text() + text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new file version for the parse cache


def _src_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(REPO / "src/adaptlab", src / "adaptlab", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def test_fingerprint_counts_code_not_comments_or_docstrings(tmp_path, monkeypatch):
    src = _src_copy(tmp_path)
    monkeypatch.setattr(fingerprint, "ROOT", src / "adaptlab")
    before = {k: fingerprint.code_fingerprint(*k) for k in KINDS}
    recorded = fingerprint.module_hashes(fingerprint.entry_module("run", "continual"))
    assert {"adaptlab.continual.run", "adaptlab.train.loop", "adaptlab.records"} <= set(recorded)
    assert "adaptlab.aggregate" not in recorded  # tables and figures are not the runs' code

    run_py = src / "adaptlab/continual/run.py"
    text = run_py.read_text()
    run_py.write_text(text.replace('"""', '"""A docstring edit. ', 1) + "\n# a comment\n")
    assert {k: fingerprint.code_fingerprint(*k) for k in KINDS} == before
    assert fingerprint.changed_modules(recorded) == []

    _edit(run_py, "_EDITED = 1\n")  # one line of code
    after = {k: fingerprint.code_fingerprint(*k) for k in KINDS}
    assert [k for k in KINDS if after[k] != before[k]] == [("run", "continual")]
    assert fingerprint.changed_modules(recorded) == ["adaptlab.continual.run"]

    _edit(src / "adaptlab/train/loop.py", "_EDITED = 1\n")  # the shared training loop: every kind of run
    assert all(fingerprint.code_fingerprint(*k) != after[k] for k in KINDS)


def test_every_summary_carries_its_provenance(pipeline_workdir):
    with duckdb.connect(str(pipeline_workdir / "results/adaptlab.duckdb"), read_only=True) as con:
        rows = con.execute(f"SELECT kind, study, {', '.join(PROVENANCE_COLUMNS)} FROM runs").fetchall()
    assert rows
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    for kind, study, commit, dirty, fp, modules, timm_v, peft_v, smk_v, device_name, host, job in rows:
        assert commit == (git.stdout.strip() if git.returncode == 0 else "no git")
        assert isinstance(dirty, bool) or commit == "no git"
        hashes = json.loads(modules)
        assert fp == fingerprint.fingerprint(hashes) == fingerprint.code_fingerprint(kind, study)
        assert timm_v and peft_v and smk_v and device_name and host
        assert job is None  # not under SLURM here


def test_code_edit_makes_exactly_that_studys_runs_stale(pipeline_workdir, tmp_path):
    wd = pipeline_workdir
    cfg = yaml.safe_load((wd / "configs/test.yaml").read_text())
    (wd / "configs/code_tracked.yaml").write_text(yaml.safe_dump({**cfg, "rerun_on_code_change": True}, sort_keys=False))
    continual = sorted(r for r, s in expected_runs(load_config(wd / "configs/test.yaml")).items() if s == "continual")
    assert continual
    src = _src_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(src)}  # an edited copy of adaptlab, ahead of the installed one

    def stale() -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "adaptlab.cli", "status", "--list", "--configfile",
                               "configs/test.yaml"], cwd=wd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("stale"))

    def planned(configfile: str) -> dict[str, list[str]]:
        proc = snakemake(wd, "-n", "--cores", "2", "--configfile", configfile, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return planned_jobs(proc.stdout + proc.stderr)

    assert stale() == [] and planned("configs/code_tracked.yaml") == {}  # switching it on reruns nothing by itself
    run_py = src / "adaptlab/continual/run.py"
    _edit(run_py, "\n# a comment-only edit\n")
    assert stale() == [] and planned("configs/code_tracked.yaml") == {}
    _edit(run_py, "_EDITED = 1\n")
    assert stale() == continual
    jobs = planned("configs/code_tracked.yaml")
    assert sorted(jobs) == ["aggregate", "all", "continual_run"]
    assert sorted(jobs["continual_run"]) == sorted(f"results/runs/{r}/summary.parquet" for r in continual)
    assert planned("configs/test.yaml") == {}  # off (the default): listed as stale, not rerun


def test_corrupt_records_do_not_block_aggregation_and_are_rerun(pipeline_workdir, tmp_path):
    wd = tmp_path / "wf"
    shutil.copytree(pipeline_workdir, wd, symlinks=True)
    runs = wd / "results/runs"
    broken = {  # run id -> the file made unreadable
        "main/noisy/full/sgd/lr0.01/seed0": "summary.parquet",  # truncated
        "main/digits/head/sgd/lr0.05/seed0": "steps.parquet",  # garbage
        "plasticity/analysis/base/noisy": "plasticity_probe.parquet",  # a study's raw table without its run_id
    }
    summary = runs / "main/noisy/full/sgd/lr0.01/seed0/summary.parquet"
    summary.write_bytes(summary.read_bytes()[:200])
    (runs / "main/digits/head/sgd/lr0.05/seed0/steps.parquet").write_bytes(os.urandom(3000))
    probe = runs / "plasticity/analysis/base/noisy/plasticity_probe.parquet"
    pq.write_table(pq.read_table(probe).drop_columns(["run_id"]), probe)
    expected = set(expected_runs(load_config(wd / "configs/test.yaml")))

    proc = snakemake(wd, "--cores", "2", "--configfile", "configs/test.yaml")  # the changed summary: re-aggregate
    assert proc.returncode == 0, proc.stderr[-3000:]
    with duckdb.connect(str(wd / "results/adaptlab.duckdb"), read_only=True) as con:
        corrupt = dict(con.execute("SELECT run_id, detail FROM run_status WHERE status = 'corrupt'").fetchall())
        loaded = {r for (r,) in con.execute("SELECT run_id FROM runs").fetchall()}
        probe_runs = {r for (r,) in con.execute("SELECT DISTINCT run_id FROM plasticity_probe").fetchall()}
    assert set(corrupt) == set(broken)
    for run_id, name in broken.items():
        assert f"results/runs/{run_id}/{name}" in corrupt[run_id]
        assert not (runs / run_id / "summary.parquet").exists()  # moved aside: the next snakemake reruns it
        assert len(list((runs / run_id / "corrupt").glob(f"*/{name}"))) == 1  # nothing deleted
    assert loaded == expected - set(broken)  # every other run aggregated
    assert "plasticity/analysis/base/noisy" not in probe_runs

    proc = snakemake(wd, "--cores", "2", "--configfile", "configs/test.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with duckdb.connect(str(wd / "results/adaptlab.duckdb"), read_only=True) as con:
        assert con.execute("SELECT run_id, status FROM run_status").fetchall() == [
            ("unstable/noisy/full/sgd/lr1e+06/seed0", "diverged")]
        assert {r for (r,) in con.execute("SELECT run_id FROM runs").fetchall()} == expected


def test_unreadable_files_are_reported_by_reader_message(tmp_path):
    from adaptlab.run_state import REQUIRED, check_file

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"run_id": ["a"], "step": [1]}), good)
    assert check_file(good, REQUIRED["steps"])[1] is None
    wrong_type = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"run_id": ["a"], "step": ["one"]}), wrong_type)
    assert check_file(wrong_type, REQUIRED["steps"])[1] == "column 'step' has type string, expected int64"
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    table, err = check_file(empty, REQUIRED["steps"])
    assert table is None and err.startswith("ArrowInvalid")


KILL_GRID = {"main": {"datasets": ["noisy"], "seeds": [0], "lrs": [0.01, 0.05], "trainable": ["full", "head"]}}


def test_killed_pipeline_finishes_with_the_same_command_and_resumes(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wd / "configs/test.yaml").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in STUDIES}
    cfg["finetune"] = {"defaults": {"steps": 600, "batch_size": 16, "eval_every": 200, "ckpt_every": 10},
                       "grids": KILL_GRID}
    (wd / "configs/kill.yaml").write_text(yaml.safe_dump(cfg))
    runs = wd / "results/runs/main/noisy"
    # the README's command (the workflow profile adds rerun-incomplete and keep-going), killed like a crash:
    # SIGKILL to the controller and its jobs once a finetuning run has written a checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "configs/kill.yaml"],
                            cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    while not list(runs.glob("*/*/*/seed0/ckpt.safetensors")):
        assert proc.poll() is None, "the pipeline ended before any run wrote a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 15 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    cut = [d for d in runs.glob("*/*/*/seed0") if (d / "ckpt.safetensors").exists() and not (d / "summary.parquet").exists()]
    assert cut

    unlock = snakemake(wd, "--unlock", "--configfile", "configs/kill.yaml", timeout=600)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    again = snakemake(wd, "--cores", "2", "--configfile", "configs/kill.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    with duckdb.connect(str(wd / "results/adaptlab.duckdb"), read_only=True) as con:
        status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
        resumed = dict(con.execute("SELECT run_id, resumed_from FROM runs").fetchall())
        assert con.execute("SELECT count(*) FROM run_status").fetchone()[0] == 0
    assert len(status) == 1 + 4 and set(status.values()) == {"ok"}
    for d in cut:
        assert resumed[str(d.relative_to(wd / "results/runs"))] > 0
