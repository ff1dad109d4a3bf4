"""The SLURM profile end to end, against mock SLURM commands (no cluster needed).

Shims for sbatch/srun/sacct/squeue/sinfo/scontrol/sacctmgr/sshare are put first on PATH. ``sbatch`` logs its
argv, runs the ``--wrap`` command synchronously in ``-D`` with ``SLURM_JOB_ID`` set and prints the job id as
``sbatch --parsable`` does; ``sacct``/``squeue`` then report that id as COMPLETED (or FAILED). The workflow is
copied to a temporary directory and run with ``--profile profiles/slurm --configfile configs/test.yaml``; the test
checks the results and the exact sbatch lines the snakemake-executor-plugin-slurm produced from the profile.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import yaml

from adaptlab.config import expand_runs, load_config
from adaptlab.studies import STUDIES, expected_run_ids, studies
from conftest import REPO, copy_workflow

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TIMEOUT_S = 1800  # a hang guard, not a speed test: a loaded 2-core machine took > 600 s for the 31-job preset

# --- the shims (Python, run by this interpreter) ---------------------------------------------------------------
# All state lives in $MOCK_SLURM_DIR: sbatch.jsonl (one argv per call), jobs.txt (id|name|state), next_id.

SBATCH = r'''
import fcntl, json, os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["MOCK_SLURM_DIR"])
argv = sys.argv[1:]
with open(state / "lock", "w") as lock:  # the plugin submits from two threads
    fcntl.flock(lock, fcntl.LOCK_EX)
    counter = state / "next_id"
    jobid = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(jobid + 1))
    with open(state / "sbatch.jsonl", "a") as f:
        f.write(json.dumps({"id": jobid, "argv": argv}) + "\n")

def opt(names):
    """Value of an option given as `--name value`, `--name=value` or `-x value`."""
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if n.startswith("--") and a.startswith(n + "="):
                return a[len(n) + 1:]
    return None

wrap = opt(["--wrap"])
if wrap is None:
    sys.exit("mock sbatch: only --wrap submissions are emulated")
workdir = opt(["-D", "--chdir"]) or os.getcwd()
name = opt(["-J", "--job-name"]) or "wrap"
logfile = (opt(["-o", "--output"]) or "slurm-%j.out").replace("%j", str(jobid))
logpath = Path(workdir, logfile)
logpath.parent.mkdir(parents=True, exist_ok=True)
env = dict(os.environ, SLURM_JOB_ID=str(jobid), SLURM_JOBID=str(jobid), SLURM_JOB_NAME=name,
           SLURM_SUBMIT_DIR=os.getcwd())
gpus = opt(["--gpus", "-G"])
if gpus:
    env["SLURM_GPUS"] = gpus
with open(logpath, "w") as log:
    rc = subprocess.run(["/bin/sh", "-c", wrap], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL).returncode
with open(state / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(state / "jobs.txt", "a") as f:
        f.write(f"{jobid}|{name}|{'COMPLETED' if rc == 0 else 'FAILED'}\n")
print(jobid)  # what `sbatch --parsable` prints on a single cluster
'''

SRUN = r'''
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):  # the jobstep passes only --opt=value / -n1 style options
    args.pop(0)
if not args:
    sys.exit("mock srun: no command")
os.execvp(args[0], args)
'''

# sacct -X --parsable2 ... --format=JobIdRaw,State --name <run-uuid>   and   squeue --format='%i|%T' --name <uuid>
STATUS = r'''
import os, sys
from pathlib import Path

argv = sys.argv[1:]
if any(a == "-j" or a.startswith("--jobs") for a in argv) or "-o" in argv or "-nu" in argv:
    sys.exit(0)  # failure-reason / node-list / account look-ups: nothing to report
name = argv[argv.index("--name") + 1] if "--name" in argv else None
jobs = Path(os.environ["MOCK_SLURM_DIR"], "jobs.txt")
for line in (jobs.read_text().splitlines() if jobs.exists() else []):
    jobid, jobname, state = line.split("|")
    if name is None or jobname == name:
        print(f"{jobid}|{state}")
'''

SINFO = 'print("PARTITION\\ncpu*\\ngpu")\n'
SCONTROL = 'print("MinJobAge               = 300 sec\\nMaxArraySize            = 1001")\n'
ACCOUNTS = 'import os; print(os.environ.get("MOCK_SLURM_ACCOUNTS", ""))\n'

SHIMS = {"sbatch": SBATCH, "srun": SRUN, "sacct": STATUS, "squeue": STATUS, "sinfo": SINFO,
         "scontrol": SCONTROL, "sacctmgr": ACCOUNTS, "sshare": ACCOUNTS}


def install_shims(bindir: Path) -> None:
    bindir.mkdir()
    for name, body in SHIMS.items():
        path = bindir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)


def opt_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if name.startswith("--") and a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def words_after(words: list[str], flag: str) -> list[str]:
    """The arguments of `flag` up to the next option."""
    if flag not in words:
        return []
    out = []
    for w in words[words.index(flag) + 1:]:
        if w.startswith("--"):
            break
        out.append(w)
    return out


def submission(argv: list[str]) -> dict:
    """What one sbatch call runs, read from the Snakemake command in its `--wrap`."""
    wrap = shlex.split(opt_value(argv, "--wrap"))
    return {"argv": argv, "rules": words_after(wrap, "--allowed-rules"), "targets": words_after(wrap, "--target-jobs"),
            "group": "--local-groupid" in wrap, "gpus": [a for a in argv if a.startswith(("--gpus", "--gres", "-G"))]}


def test_slurm_profile_with_mock_slurm(tmp_path):
    profile = yaml.safe_load(PROFILE.read_text())
    account = str(profile["default-resources"]["slurm_account"])
    cpu_partition = profile["default-resources"]["slurm_partition"]
    gpu_partition = profile["set-resources"]["finetune"]["slurm_partition"]
    finetune_runtime = profile["set-resources"]["finetune"]["runtime"]
    assert profile["resources"]["gpu"] == 1 and profile["set-resource-scopes"]["gpu"] == "local"

    bindir, state, work = tmp_path / "bin", tmp_path / "slurm", tmp_path / "wf"
    install_shims(bindir)
    state.mkdir()
    copy_workflow(work)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", MOCK_SLURM_DIR=str(state),
               MOCK_SLURM_ACCOUNTS=account.lower())
    # Speed-ups only: the plugin submits from 2 threads and the mock sbatch runs each job to its end, so 2 finetune
    # groups (instead of the profile's 25 runs per group, which makes a single group here) halve the wall time.
    # The profile's own group size is checked on the paper preset by test_slurm_profile_dry_run_paper.
    group_size = 5
    cmd = [sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", "--configfile", "configs/test.yaml",
           "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5", "--retries", "0",
           "--group-components", f"finetune={group_size}", "--slurm-keep-successful-logs"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    elapsed = time.time() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake failed after {elapsed:.0f} s:\n{log[-6000:]}"

    # --- results: every expected run (+ the pretrain record) reached the database ------------------------------
    cfg = load_config(work / "configs" / "test.yaml")
    n_runs = len(expand_runs(cfg))
    assert n_runs == 11  # 8 in grid `main`, 1 in grid `unstable`, 2 in grid `components`
    n_expected = len(expected_run_ids(cfg))  # + pretraining and every study's runs
    assert n_expected == n_runs + 1 + sum(len(s.specs(cfg)) for s in studies())
    db = work / "results" / "adaptlab.duckdb"
    assert db.exists()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == n_expected
        assert {r for (r,) in con.execute("SELECT DISTINCT study FROM runs").fetchall()} >= set(STUDIES)
        assert con.execute("SELECT count(*) FROM runs WHERE study = 'pretrain'").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM runs WHERE grid = 'unstable'").fetchone()[0] == 1

    # --- the sbatch lines --------------------------------------------------------------------------------------
    calls = [submission(json.loads(line)["argv"]) for line in (state / "sbatch.jsonl").read_text().splitlines()]
    for c in calls:  # every submission: the profile's account, the parsable output the plugin parses, the workdir
        assert opt_value(c["argv"], "-A") == account and "--parsable" in c["argv"], c["argv"]
        assert opt_value(c["argv"], "-D") == str(work), c["argv"]
        # one rule per submission, except a group job of connected jobs (e.g. icl_uni → icl_mm of group "icl")
        assert c["targets"] and (len(c["rules"]) == 1 or c["group"]), c["argv"]
    by_rule: dict[str, list[dict]] = {}
    for c in calls:
        for rule in c["rules"]:
            by_rule.setdefault(rule, []).append(c)

    # aggregate is a localrule: it ran in the controller (its outputs exist), never through sbatch; `all` has no job
    # every rule of every study was submitted, and each rule that writes a run record went where its set-resources
    # entry sends it: the GPU partition with exactly one GPU, or the CPU partition with none
    data_rules = {"prepare_data", "peft_seg_data"}
    assert set(by_rule) == data_rules | set(profile["set-resources"]), sorted(by_rule)
    for rule, entry in profile["set-resources"].items():
        for job in by_rule[rule]:
            assert job["gpus"] == (["--gpus=1"] if entry.get("gpu") else []), (rule, job["argv"])
            assert opt_value(job["argv"], "-p") == entry["slurm_partition"], (rule, job["argv"])
    for job in by_rule["peft_seg_data"]:
        assert job["gpus"] == [] and opt_value(job["argv"], "-p") == cpu_partition, job["argv"]
    assert not any("aggregate" in t for c in calls for t in c["targets"])
    assert "localrule aggregate" in log

    # data prep: the CPU partition, no GPU, one submission per dataset
    assert sorted(t for c in by_rule["prepare_data"] for t in c["targets"]) == [
        "prepare_data:dataset=digits", "prepare_data:dataset=noisy", "prepare_data:dataset=source"]
    for c in by_rule["prepare_data"]:
        assert c["gpus"] == [] and opt_value(c["argv"], "-p") == cpu_partition, c["argv"]

    # pretrain: one job, one GPU on the GPU partition
    (pretrain,) = by_rule["pretrain"]
    assert pretrain["gpus"] == ["--gpus=1"] and not pretrain["group"], pretrain["argv"]
    assert opt_value(pretrain["argv"], "-p") == gpu_partition

    # finetune: grouped (fewer submissions than runs), each group exactly ONE GPU, its runs in series
    groups = by_rule["finetune"]
    assert 1 <= len(groups) < n_runs
    assert len(groups) == -(-n_runs // group_size)
    members = []
    for g in groups:
        assert g["group"] and g["gpus"] == ["--gpus=1"], g["argv"]
        assert opt_value(g["argv"], "-p") == gpu_partition
        assert all(t.startswith("finetune:") for t in g["targets"]) and len(g["targets"]) <= group_size
        members += g["targets"]
        # in series on the one GPU: the wall time is the sum of the members' runtimes, the memory that of one run
        assert int(opt_value(g["argv"], "-t")) == finetune_runtime * len(g["targets"]), g["argv"]
        assert int(opt_value(g["argv"], "--mem")) == profile["set-resources"]["finetune"]["mem_mb"], g["argv"]
    assert len(members) == len(set(members)) == n_runs

    # every submitted job ran under the mock and was reported COMPLETED to the controller's status queries
    assert (state / "jobs.txt").read_text().count("|COMPLETED") == len(calls)
    short = lambda c: shlex.join(a for a in c["argv"] if not a.startswith("--wrap"))  # noqa: E731
    print(f"\nsnakemake with mock SLURM: {elapsed:.1f} s, {len(calls)} sbatch calls "
          f"({len(groups)} finetune groups for {n_runs} runs)")
    print("pretrain:      sbatch", short(pretrain))
    print("finetune group: sbatch", short(groups[0]), f"--wrap=<{len(groups[0]['targets'])} finetune jobs>")


def job_rules() -> dict[str, str]:
    """Every rule that runs something (script/shell) and is not a localrule: rule name -> its rules file."""
    local = set()
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.findall(r"^localrules:\s*([^\n]+)", text, flags=re.M):
            local |= {r.strip() for r in block.split(",") if r.strip()}
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, flags=re.M):
            if re.search(r"^\s+(script|shell|run):", body, flags=re.M):
                rules[name] = smk.name
    return {r: f for r, f in rules.items() if r not in local}


def test_every_job_rule_has_explicit_cluster_resources():
    profile = yaml.safe_load(PROFILE.read_text())
    entries = profile["set-resources"]
    rules = job_rules()
    assert {"prepare_data", "finetune", "precond_train", "icl_uni", "continual_run", "peft_run"} <= set(rules)
    for rule, smk in rules.items():
        assert rule in entries, f"profiles/slurm: rule {rule} (rules/{smk}) has no set-resources entry"
        entry = entries[rule]
        for key in ("slurm_partition", "runtime", "mem_mb", "cpus_per_task"):
            assert key in entry, f"profiles/slurm: set-resources.{rule} has no {key}"
        if entry.get("gpu"):
            assert entry["gpu"] == 1 and "GPU" in entry["slurm_partition"], (rule, entry)
    assert set(entries) <= set(rules), "set-resources entries for rules that do not exist"


def test_slurm_profile_dry_run_paper_resolves_every_rules_resources(tmp_path):
    """`snakemake -n` with the profile on the paper preset: no data or SLURM needed. Every job resolves to its rule's
    entry (partition, GPU, runtime, memory, CPUs); finetune runs are grouped by the profile's group size."""
    profile = yaml.safe_load(PROFILE.read_text())
    entries = profile["set-resources"]
    group_size = profile["group-components"]["finetune"]
    work = tmp_path / "wf"
    copy_workflow(work)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm", "--configfile",
                           "configs/paper.yaml"], cwd=work, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    n_runs = len(expand_runs(load_config(work / "configs" / "paper.yaml")))
    assert log.count("Group job finetune") == -(-n_runs // group_size)
    jobs = re.findall(r"^[ \t]*(?:local)?rule (\w+):\n((?:[ \t]+.*\n)*?[ \t]+resources: .*\n)", log, flags=re.M)
    by_rule: dict[str, list[dict]] = {}
    for rule, body in jobs:
        found = re.findall(r"^\s+resources: (.*)$", body, flags=re.M)[-1]
        res = dict(kv.split("=", 1) for kv in found.split(", "))
        by_rule.setdefault(rule, []).append(res)
    for study_rule in ("precond_train", "icl_uni", "continual_run", "peft_run", "finetune", "plasticity_analysis"):
        assert by_rule.get(study_rule), f"the paper preset plans no {study_rule} job"
    lines = [f"paper dry run: {elapsed:.1f} s"]
    for rule, resolved in sorted(by_rule.items()):
        if rule in ("aggregate", "all"):
            continue
        entry = entries[rule]
        for res in resolved:
            assert res.get("slurm_partition") == entry["slurm_partition"], (rule, res)
            assert int(res["runtime"]) == entry["runtime"] and int(res["mem_mb"]) == entry["mem_mb"], (rule, res)
            assert int(res["cpus_per_task"]) == entry["cpus_per_task"], (rule, res)
            assert (res.get("gpu") == "1") == bool(entry.get("gpu")), (rule, res)
        lines.append(f"  {rule:20s} {len(resolved):5d} jobs  partition={entry['slurm_partition']} "
                     f"gpu={entry.get('gpu', 0)} runtime={entry['runtime']} min mem_mb={entry['mem_mb']} "
                     f"cpus={entry['cpus_per_task']}")
    print("\n" + "\n".join(lines))
