"""The SLURM profile against a real scheduler: slurmctld + slurmd on this machine (tests/slurm/local_slurm.sh).

The cluster is stood up once per session (packages via apt-get when missing; root needed) and stopped at the end.
Where it cannot start (not root, no apt-get, daemons fail), every test here is skipped with the reason, and
tests/test_slurm.py still checks the profile against mock SLURM commands. The profile is used as a user would: a
site copy with the SITE values filled in for this one node (partitions `cpu`/`gpu`, memory and CPUs that fit),
`--slurm-no-account`. Every controller runs under a hard timeout, so a hung scheduler fails a test, never CI.
"""
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
import pytest
import yaml

from adaptlab.config import expand_runs, load_config
from adaptlab.records import TIMING_COLUMNS, read_summary
from conftest import REPO, copy_workflow

SCRIPT = REPO / "tests" / "slurm" / "local_slurm.sh"
CONTROLLER_TIMEOUT_S = 1500  # a hang guard: the test preset takes a few minutes here


@pytest.fixture(scope="session")
def cluster(local_slurm):
    """The local cluster (conftest.local_slurm keeps it up for the session); installed here when missing."""
    reason = local_slurm
    if reason is not None and shutil.which("slurmctld") is None and os.geteuid() == 0:
        inst = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
        start = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
        if inst.returncode == 0 and start.returncode == 0:
            reason = None
            yield
            subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=60)
            subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=60)
            return
        reason = f"could not install/start SLURM: {(inst.stderr + start.stderr).strip()[-600:]}"
    if reason is not None:
        pytest.skip(f"{reason}; tests/test_slurm.py covers the profile with mock SLURM commands")
    yield


def site_profile(work: Path, finetune_minutes: int | None = None, **overrides) -> Path:
    """A copy of profiles/slurm with the SITE values filled in for the local node, as a user edits it.
    ``finetune_minutes``: a time limit per finetune run and no early warning signal, so the limit's own SIGTERM
    stops it; ``overrides``: top-level profile keys."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    cpus = os.cpu_count() or 1
    defaults = profile["default-resources"]
    defaults.pop("slurm_account")
    defaults.update(slurm_partition="cpu", mem_mb=1000, cpus_per_task=1)
    for entry in profile["set-resources"].values():
        entry["slurm_partition"] = "gpu" if entry.get("gpu") else "cpu"
        entry.update(mem_mb=min(entry["mem_mb"], 2000), cpus_per_task=min(entry.get("cpus_per_task", 1), cpus))
    # retries 6: a time-limited run needs as many attempts as its training takes minutes; more than the profile's 3
    # leaves room for a slower machine
    profile.update({"slurm-no-account": True, "slurm-init-seconds-before-status-checks": 2, "latency-wait": 5,
                    "retries": 6})
    if finetune_minutes is not None:
        profile["set-resources"]["finetune"]["runtime"] = finetune_minutes
        defaults["slurm_extra"] = "''"
    profile.update(overrides)
    dest = work / "profiles" / "slurm-site"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def controller(work: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    return subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", "profiles/slurm-site", *args], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = CONTROLLER_TIMEOUT_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # SIGINT makes the controller scancel its jobs
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"the controller did not finish in {timeout} s:\n{out[-6000:]}")
    return out


def job_info(job_id: str) -> dict:
    """`scontrol show job` as a dict (MinJobAge keeps a finished job there for a while)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def summaries(work: Path) -> dict[str, dict]:
    return {p.parent.name: read_summary(p) for p in (work / "results" / "runs").rglob("summary.parquet")
            if ".finished" not in p.parts and "corrupt" not in p.parts}


def test_test_preset_through_the_profile_on_a_real_scheduler(cluster, tmp_path):
    work = copy_workflow(tmp_path / "wf")
    site_profile(work)
    t0 = time.time()
    proc = controller(work, "--configfile", "configs/test.yaml")
    log = finish(proc)
    elapsed = time.time() - t0
    assert proc.returncode == 0, log[-6000:]
    with duckdb.connect(str(work / "results" / "adaptlab.duckdb"), read_only=True) as con:
        status = dict(con.execute("SELECT state, count(*) FROM run_states GROUP BY state").fetchall())
        designed = con.execute("SELECT run_id FROM runs WHERE grid = 'unstable'").fetchall()
    # every run ok but the one diverging by design (grid `unstable`), which is recorded as such
    assert status == {"ok": sum(status.values()) - 1, "diverged": 1} and len(designed) == 1, status
    assert sum(status.values()) > 20

    # every training run went through sbatch to the GPU partition with one GPU; data prep to the CPU partition
    rules = yaml.safe_load((work / "profiles" / "slurm-site" / "config.yaml").read_text())["set-resources"]
    seen = set()
    for run_id, row in summaries(work).items():
        assert row["slurm_job_id"], (run_id, "ran outside SLURM")
        info = job_info(row["slurm_job_id"].split("_")[0])
        kind = row["kind"]
        rule = {"finetune": "finetune", "pretrain": "pretrain"}.get(kind, kind)
        if rule in rules and rules[rule].get("gpu"):
            assert info.get("Partition") == "gpu" and info.get("TresPerJob") == "gres:gpu:1", (run_id, info)
            seen.add(rule)
    assert {"pretrain", "finetune"} <= seen
    assert "localrule aggregate" in log  # aggregation ran in the controller, not as a job
    print(f"\ntest preset on a real SLURM: {elapsed:.0f} s, {sum(status.values())} runs {status}")


def _metrics(row: dict) -> dict:
    skip = set(TIMING_COLUMNS) | {"resumed_from", "slurm_job_id", "hostname"}
    return {k: v for k, v in row.items() if k not in skip}


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"controller ended while waiting for {what}:\n{proc.communicate()[0][-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGINT)
            pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{proc.communicate(timeout=120)[0][-4000:]}")
        time.sleep(0.5)


LONG_RUN = {"study": "stress", "datasets": ["noisy"], "seeds": [0], "lrs": [0.003], "optimizers": ["adamw"],
            "trainable": ["full"]}


def _long_run_config(work: Path, steps: int = 1500, batch_size: int = 32) -> Path:
    """The test preset with one finetune grid of one run long enough to be stopped mid-way."""
    cfg = yaml.safe_load((work / "configs" / "test.yaml").read_text())
    every = steps // 3
    cfg["finetune"]["grids"] = {"long": {**LONG_RUN, "train": {"steps": steps, "eval_every": every,
                                                                 "ckpt_every": every, "batch_size": batch_size}}}
    path = work / "configs" / "long.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# the rate of the long run's bare training step, measured as a job measures it: in a fresh process that keeps freed
# memory (adaptlab.jobstart) on one thread; prints steps per second, the fastest of 6 blocks of 40 steps
_RATE_SCRIPT = """
import time, torch
from adaptlab.jobstart import keep_freed_memory
from timm.models.vision_transformer import VisionTransformer
keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = VisionTransformer(img_size=16, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x, y = torch.randn(256, 3, 16, 16), torch.randint(10, (256,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
for _ in range(20):
    step()
blocks = []
for _ in range(6):
    t = time.perf_counter()
    for _ in range(40):
        step()
    blocks.append(40 / (time.perf_counter() - t))
print(max(blocks))
"""


def _steps_lasting(seconds: float) -> int:
    """Steps of the long run (batch 256) that train for about ``seconds`` on this machine, from the rate of the same
    timm ViT's bare training step here (the run's loop reached 0.85 of it on a 2-core machine): a test that needs a
    run to outlast one time limit but not two must not depend on the machine's speed (machines here differ 2×).

    Measured in a fresh process set up as a job's (``_RATE_SCRIPT``), not in the test's own: late in a full suite
    the pytest process ran the same step at a quarter of a fresh process's rate (44 against ~175 steps/s), so both
    members of the timed-out group were sized at a quarter of their intended time and finished inside the limit. The
    fastest of 6 blocks: the job runs alone in its allocation, while the measurement may share the cores for a
    moment."""
    out = subprocess.run([sys.executable, "-c", _RATE_SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    rate = float(out.stdout.strip().splitlines()[-1])
    return max(1500, min(60000, int(seconds * 0.85 * rate) // 3 * 3))


def _target(work: Path) -> str:
    """The summary of the one run of grid ``long`` (a target: only it and its inputs run)."""
    (run,) = expand_runs(load_config(work / "configs" / "long.yaml"))
    return f"{run.run_dir}/summary.parquet"


@pytest.mark.parametrize("how", ["scancel_term", "time_limit"])
def test_a_stopped_training_job_checkpoints_and_its_retry_resumes_to_the_same_summary(cluster, tmp_path, how):
    work = copy_workflow(tmp_path / "wf")
    # ~15 s of training here; the time-limit case ~2 minutes, more than one 1-minute attempt
    steps, batch = (1500, 32) if how == "scancel_term" else (15000, 256)
    _long_run_config(work, steps, batch)
    # time limit: 1 minute per attempt; at the limit SLURM sends SIGTERM, SIGKILL 10 s (KillWait) later
    site_profile(work, finetune_minutes=1 if how == "time_limit" else None)
    run = work / Path(_target(work)).parent
    proc = controller(work, _target(work), "--configfile", "configs/long.yaml")
    _wait_for(lambda: (run / "ckpt.safetensors").exists() and (run / "running.json").exists(), 600,
              "a first checkpoint", proc)
    first_job = json.loads((run / "running.json").read_text())["slurm_job_id"]
    if how == "scancel_term":
        subprocess.run(["scancel", "--signal=TERM", first_job], check=True)
    log = finish(proc)
    assert proc.returncode == 0, log[-6000:]
    row = read_summary(run / "summary.parquet")
    assert row["status"] == "ok" and row["resumed_from"] > 0, row
    assert row["slurm_job_id"] != first_job  # the retry finished it
    slurm_logs = "".join(p.read_text() for p in (work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert f"stopped by SIGTERM at step {row['resumed_from']}" in slurm_logs + log

    # the same run, uninterrupted, on this machine: the same summary
    straight = copy_workflow(tmp_path / "straight")
    _long_run_config(straight, steps, batch)
    local = subprocess.run([sys.executable, "-m", "snakemake", str(run.relative_to(work) / "summary.parquet"),
                            "--cores", "2", "--configfile", "configs/long.yaml"], cwd=straight, capture_output=True,
                           text=True, timeout=900)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    other = read_summary(straight / run.relative_to(work) / "summary.parquet")
    assert other["resumed_from"] == 0 and _metrics(row) == _metrics(other)
    print(f"\n{how}: resumed_from={row['resumed_from']} (job {first_job} stopped, retry {row['slurm_job_id']}); "
          f"summary equal to the uninterrupted run's")


def test_a_killed_controller_restarts_without_a_second_writer(cluster, tmp_path):
    work = copy_workflow(tmp_path / "wf")
    # the orphan must still train when the restarted controller's job starts: ~40 s left after its first checkpoint
    # (1500 steps of batch 32, ~10 s left, raced the unlock and the restart on a slow machine and finished first)
    _long_run_config(work, _steps_lasting(60), 256)
    site_profile(work)
    proc = controller(work, _target(work), "--configfile", "configs/long.yaml")
    run = work / Path(_target(work)).parent
    _wait_for(lambda: (run / "ckpt.safetensors").exists() and (run / "running.json").exists(), 600,
              "the long run to train", proc)
    orphan = json.loads((run / "running.json").read_text())["slurm_job_id"]
    os.killpg(proc.pid, signal.SIGKILL)  # the controller dies; its SLURM job trains on as an orphan
    proc.wait()
    assert job_info(orphan).get("JobState") == "RUNNING"

    subprocess.run([sys.executable, "-m", "snakemake", "--profile", "profiles/slurm-site", "--configfile",
                    "configs/long.yaml", "--unlock"], cwd=work, capture_output=True, timeout=120, check=True)
    restart = controller(work, _target(work), "--configfile", "configs/long.yaml")
    log = finish(restart)
    assert restart.returncode == 0, log[-6000:]
    row = read_summary(run / "summary.parquet")
    assert row["status"] == "ok"
    # the record is the orphan's: the resubmitted job waited on the run's lock and kept it, it did not train
    assert row["slurm_job_id"] == orphan and row["resumed_from"] == 0
    job_log = (run / "job.log").read_text()
    assert "locked by another process" in job_log or "restored, not retrained" in job_log, job_log[-2000:]
    print(f"\nkilled controller: orphan job {orphan} finished the run; the restarted controller kept its record")


def test_a_timed_out_group_keeps_its_finished_member_and_resumes_the_other(cluster, tmp_path):
    """Two equal finetune runs (seeds 0 and 1) in one group job with a 2-minute limit (1 per member): whichever runs
    first finishes, the other is stopped by the time limit. Snakemake removes both members' outputs; the retry
    restores the finished run's records (not retrained) and resumes the other from its checkpoint. (Equal members:
    Snakemake's order inside a group job is not fixed, and with unequal ones a long-first order never stops a
    finished member.)"""
    work = copy_workflow(tmp_path / "wf")
    # each member trains ~85 s: more than half the group's 2-minute limit, less than all of it
    _long_run_config(work, _steps_lasting(85), 256)
    cfg_path = work / "configs" / "long.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["finetune"]["grids"]["long"]["seeds"] = [0, 1]
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    site_profile(work, finetune_minutes=1, **{"group-components": {"finetune": 2}})
    runs = sorted(expand_runs(load_config(cfg_path)), key=lambda r: r.seed)
    proc = controller(work, *[f"{r.run_dir}/summary.parquet" for r in runs], "--configfile", "configs/long.yaml")
    log = finish(proc)
    assert proc.returncode == 0, log[-6000:]
    rows = [read_summary(work / r.run_dir / "summary.parquet") for r in runs]
    assert all(r["status"] == "ok" for r in rows)
    (first, finished_first), (_, stopped) = sorted(zip(runs, rows), key=lambda rr: rr[1]["resumed_from"])
    assert finished_first["resumed_from"] == 0 and stopped["resumed_from"] > 0, rows
    # the finished member's record is the first group job's, restored by the retry; the other run finished there
    assert finished_first["slurm_job_id"] != stopped["slurm_job_id"]
    assert "restored, not retrained" in (work / first.run_dir / "job.log").read_text()
    print(f"\ntimed-out group: finished member kept from job {finished_first['slurm_job_id']}, the other resumed "
          f"from step {stopped['resumed_from']} in job {stopped['slurm_job_id']}")
