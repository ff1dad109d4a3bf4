"""Preemption (SIGTERM/SIGUSR1 → checkpoint at that step, exit 75, resume), one writer per run directory, and the
kept records a retry restores instead of retraining (adaptlab.preemption, adaptlab.run_dir)."""
from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from adaptlab.data.prepare import prepare_dataset
from adaptlab.records import TIMING_COLUMNS, read_summary
from adaptlab.run_dir import FINISHED_DIR, LOCK_NAME
from adaptlab.runner import run_finetune
from adaptlab.train.checkpoint import read_checkpoint_meta
from adaptlab.preemption import EXIT_PREEMPTED
from conftest import TINY_MODEL, make_run

TESTS = str(Path(__file__).parent)

# A job as the workflow runs it: the script's job_log around the run function; ``stop_at`` sends the signal to
# this process from inside step ``stop_at`` (as SLURM does, from outside, at any moment); ``sleep``: seconds per step.
JOB = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from conftest import TINY_MODEL, make_run
from adaptlab.joblog import job_log
from adaptlab.runner import run_finetune
def on_step(step):
    time.sleep({sleep})
    if step == {stop_at}:
        os.kill(os.getpid(), signal.{sig})
with job_log({log!r}):
    run_finetune(make_run(optimizer={opt!r}, lr=0.003), TINY_MODEL, {pre!r}, {data!r}, {out!r}, device="cpu",
                 on_step=on_step)
"""


def _job(out: Path, pre, data, *, sig="SIGTERM", stop_at=-1, sleep=0.0, opt="adamw") -> subprocess.Popen:
    script = JOB.format(tests=TESTS, sig=sig, stop_at=stop_at, sleep=sleep, opt=opt, log=str(out / "job.log"),
                        pre=str(pre), data=str(data), out=str(out))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_COLUMNS and k not in ("resumed_from", "slurm_job_id")}


@pytest.mark.parametrize("sig,opt", [("SIGTERM", "adamw"), ("SIGUSR1", "sgd")])
def test_signal_checkpoints_at_that_step_and_the_retry_equals_an_uninterrupted_run(tiny_data, tiny_pretrained,
                                                                                 tmp_path, sig, opt):
    out = tmp_path / "stopped"
    out.mkdir()
    proc = _job(out, tiny_pretrained, tiny_data, sig=sig, stop_at=6, opt=opt)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, err
    # checkpoints every 4 steps, but the signal came in step 6: the checkpoint is at step 6, no records yet
    assert read_checkpoint_meta(out / "ckpt.safetensors")["step"] == 6
    assert not (out / "summary.parquet").exists() and not (out / "running.json").exists()
    assert f"stopped by {sig} at step 6" in (out / "job.log").read_text()

    resumed = run_finetune(make_run(optimizer=opt, lr=0.003), TINY_MODEL, tiny_pretrained, tiny_data, out,
                           device="cpu")
    straight = run_finetune(make_run(optimizer=opt, lr=0.003), TINY_MODEL, tiny_pretrained, tiny_data,
                            tmp_path / "straight", device="cpu")
    assert resumed["resumed_from"] == 6 and straight["resumed_from"] == 0
    assert resumed["status"] == "ok" and _metrics(resumed) == _metrics(straight)
    assert pq.read_table(out / "steps.parquet").to_pylist() == \
        pq.read_table(tmp_path / "straight" / "steps.parquet").to_pylist()


def test_a_second_process_waits_for_the_first_and_keeps_its_records(tiny_data, tiny_pretrained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    first = _job(out, tiny_pretrained, tiny_data, sleep=0.5)  # 12 steps: ≥ 6 s of training after the imports
    deadline = time.monotonic() + 120
    while not (out / "running.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.2)
    second = _job(out, tiny_pretrained, tiny_data)  # e.g. resubmitted by a restarted controller
    _, err1 = first.communicate(timeout=180)
    _, err2 = second.communicate(timeout=180)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert "is locked by another process" in err2 and "restored, not retrained" in err2
    kept = read_summary(out / FINISHED_DIR / "summary.parquet")
    assert read_summary(out / "summary.parquet") == kept  # the first job's record, wall time included
    assert (out / "summary.parquet").stat().st_ino == (out / FINISHED_DIR / "summary.parquet").stat().st_ino


def test_lock_is_exclusive_while_a_run_trains(tiny_data, tiny_pretrained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_NAME, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer holds the run
        job = _job(out, tiny_pretrained, tiny_data)
        deadline = time.monotonic() + 120
        while "locked by another process" not in (out / "job.log").read_text() if (out / "job.log").exists() else True:
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
        assert job.poll() is None and not (out / "running.json").exists()  # waiting, not training
    _, err = job.communicate(timeout=180)
    assert job.returncode == 0, err
    assert read_summary(out / "summary.parquet")["status"] == "ok"


def test_records_removed_by_a_failed_group_are_restored_not_retrained(tiny_data, tiny_pretrained, tmp_path):
    data = tmp_path / "data.safetensors"  # this test's own copy: it rewrites it
    shutil.copy(tiny_data, data)
    out = tmp_path / "run"
    run = make_run(lr=0.003)
    first = run_finetune(run, TINY_MODEL, tiny_pretrained, data, out, device="cpu")
    for name in ("summary.parquet", "steps.parquet"):  # what Snakemake does to every member of a failed group job
        (out / name).unlink()
    again = run_finetune(run, TINY_MODEL, tiny_pretrained, data, out, device="cpu")
    assert again == first  # the same record, wall time and host included: restored, not trained

    shutil.copy(tiny_data, data)  # rewritten with the same bytes (a dataset prepared again): the same input
    (out / "summary.parquet").unlink()
    assert run_finetune(run, TINY_MODEL, tiny_pretrained, data, out, device="cpu") == first

    prepare_dataset("tiny", {"kind": "procedural", "classes": 4, "image_size": 16, "n_train": 128, "n_val": 32,
                             "n_test": 32, "seed": 1}, data)  # other content: a new input, train
    (out / "summary.parquet").unlink()
    retrained = run_finetune(run, TINY_MODEL, tiny_pretrained, data, out, device="cpu")
    assert retrained["wall_seconds"] != first["wall_seconds"] and retrained["final_loss"] != first["final_loss"]

    other = run_finetune(make_run(lr=0.004), TINY_MODEL, tiny_pretrained, data, out, device="cpu")
    assert other["lr"] == 0.004 and other["final_loss"] != first["final_loss"]  # another config: trained


def test_a_damaged_kept_record_is_not_restored(tiny_data, tiny_pretrained, tmp_path):
    run = make_run(lr=0.003)
    first = run_finetune(run, TINY_MODEL, tiny_pretrained, tiny_data, tmp_path, device="cpu")
    with open(tmp_path / "summary.parquet", "r+b") as fh:  # damaged in place: the kept link shares the bytes
        fh.truncate(10)
    again = run_finetune(run, TINY_MODEL, tiny_pretrained, tiny_data, tmp_path, device="cpu")
    assert _metrics(again) == _metrics(first) and again["wall_seconds"] != first["wall_seconds"]
    assert read_summary(tmp_path / "summary.parquet")["status"] == "ok"


def test_without_a_signal_the_handlers_are_restored(tiny_data, tiny_pretrained, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    run_finetune(make_run(), TINY_MODEL, tiny_pretrained, tiny_data, tmp_path, device="cpu")
    assert signal.getsignal(signal.SIGTERM) is before


# A continual run (several fit calls, one optimizer across tasks) stopped inside a task by SIGTERM, or killed outright
# (SIGKILL) after its first task: the retry resumes and writes the records of an uninterrupted run.
CONTINUAL_JOB = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import adaptlab.continual.run as cr
from adaptlab.joblog import job_log
specs = json.loads({specs!r})
seen = [0]
def on_step(step):
    seen[0] += 1
    if seen[0] == {stop_at}:
        os.kill(os.getpid(), signal.{sig})
real_fit = cr.fit
cr.fit = lambda *a, **k: real_fit(*a, **{{**k, "on_step": on_step}})
with job_log(*{logs!r}):
    cr.{call}
"""


# the MLP's online accuracy of a task resumed inside differs from its first steps' (the ViT's happened to agree)
@pytest.mark.parametrize("sig,stop_at,code,model", [("SIGTERM", 9, EXIT_PREEMPTED, "mlp"),
                                                    ("SIGKILL", 13, -signal.SIGKILL, "vit")])
def test_a_stopped_continual_run_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, sig, stop_at, code, model):
    import copy
    import json

    from adaptlab.config import validate_config
    from adaptlab.continual import specs as continual_specs
    from adaptlab.continual.run import run_continual
    from test_continual import MINI, MORE_GRIDS

    cfg = copy.deepcopy(MINI)
    grid = MORE_GRIDS["v"] if model == "vit" else cfg["continual"]["grids"]["t"]
    cfg["continual"]["grids"] = {"v": {**grid, "methods": ["redo"], "tasks": 3, "steps": 6}}
    (spec,) = continual_specs(validate_config(cfg)).values()
    out = tmp_path / "stopped"
    out.mkdir()
    script = CONTINUAL_JOB.format(tests=TESTS, specs=json.dumps([spec]), stop_at=stop_at, sig=sig,
                                  logs=[str(out / "job.log")], call=f"run_continual(specs[0], {str(out)!r}, on_error='raise')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert (out / "ckpt.safetensors").exists() and not (out / "summary.parquet").exists()
    # SIGTERM in step 3 of task 1: task 0 is in the run's checkpoint, task 1's first 3 steps in fit's
    assert read_checkpoint_meta(out / "ckpt.safetensors")["next_task"] == (1 if sig == "SIGTERM" else 2)
    assert (out / "fit" / "ckpt.safetensors").exists() == (sig == "SIGTERM")

    resumed = run_continual(spec, out, on_error="raise")
    straight = run_continual(spec, tmp_path / "straight", on_error="raise")
    assert resumed["status"] == "ok" and resumed["n_tasks"] == 3
    assert _metrics(resumed) == _metrics(straight)
    for table in ("steps", "continual_task_metrics"):
        assert pq.read_table(out / f"{table}.parquet").to_pylist() == \
            pq.read_table(tmp_path / "straight" / f"{table}.parquet").to_pylist(), table
    assert not (out / "ckpt.safetensors").exists()  # removed once the run is recorded
