"""Run packs: several runs of one rule trained by one job, in one process.

Every job is a new Python process that imports torch and timm (~9.5 s of CPU on a fresh 2-core machine) and loads
its data before it trains; a default finetuning run trains for ~6 s. A pack pays that once for all its members.
Each member still writes its own records into its own run directory (``summary.parquet``, ``steps.parquet``, raw
tables, ``job.log``), exactly as a job of its own would: the tables, the SQL and ``run_status`` do not know packs.

**Membership** (``plan``) is a function of the config alone: the members of a rule that share the values of the
rule's ``by`` wildcards (e.g. grid and dataset of a finetuning grid) form a key; sorted by run id, a key's members
are cut into packs of at most ``size``. A one-value change therefore touches only the packs whose key holds a
changed run (when a key's member count changes, its later members may move to a sibling pack of the same key:
they are restored there, not retrained). ``size: 1`` is one run per job, the rule's own job.

**Incremental.** Snakemake reruns a whole pack when one member's params, inputs or code change, and removes every
member's outputs first. Each member then goes through ``runner.execute`` as always, whose kept records
(``adaptlab.run_dir``: keyed by the member's config, its code fingerprint and its inputs' content) are restored
instead of retrained: a one-lr change retrains exactly one run, and a pack killed halfway keeps the members it
finished.

**Fused** (``fuse: true``): members that share architecture, data and step count train as one batched model
(``adaptlab.train.fused``) through the same training loop; the rest train one after another.

The planning half imports no torch (the Snakefile uses it at parse time); ``run_pack`` imports the runners.
Written by hand: grouping a list and a loop over its members; Snakemake has no notion of several jobs in a process.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable

from adaptlab.preemption import EXIT_PREEMPTED

# Config keys that say how runs are laid out in jobs, not what a run is: never part of a run's spec (its params,
# its record key), so changing them reruns nothing that is not restored.
LAYOUT_KEYS = ("pack", "fuse")


@dataclass
class Pack:
    """One pack job: its rule name, the base rule it packs and its members (run id -> wildcards), in run-id order."""

    name: str
    rule: str
    members: dict[str, dict] = field(default_factory=dict)
    fuse: bool = False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "all"


def plan(rule: str, members: dict[str, dict], by: tuple[str, ...], size: Callable[[dict], int],
         fuse: Callable[[dict], bool] = lambda wc: False) -> list[Pack]:
    """The packs of ``rule``: ``members`` (run id -> wildcards) keyed by the ``by`` wildcards and their pack size,
    each key cut into packs of at most ``size`` in run-id order. Members whose size is 1 are left to the rule's own
    job. Pack names are ``<rule>_pack_<key>_<i>``: stable while the config's keys are."""
    keyed = []
    for rid, wc in members.items():
        n = int(size(wc))
        if n > 1:
            keyed.append(((tuple(str(wc[k]) for k in by), n, bool(fuse(wc))), rid))
    packs, names = [], {}
    for (key, n, fused), group in groupby(sorted(keyed), key=lambda kr: kr[0]):
        rids = [rid for _, rid in group]
        for i in range(0, len(rids), n):
            name = f"{rule}_pack_{_slug('_'.join(key))}_{i // n}"
            digest = hashlib.sha1(repr((key, n)).encode()).hexdigest()[:6]
            if name in names and names[name] != (key, n):  # two keys with one slug, or one key at two sizes
                name = f"{name}_{digest}"
            names[name] = (key, n)
            packs.append(Pack(name, rule, {rid: members[rid] for rid in rids[i:i + n]}, fused))
    return packs


# --- running a pack (imports torch through the runners) ---------------------------------------------------------

def _finetune_job(member: dict, threads: int) -> dict:
    from adaptlab.runner import run_finetune

    p, i = member["params"], member["input"]
    run = json.loads(p["run"])
    return run_finetune(run, run["model"], i["model"], i["data"], member["out_dir"], device=p["device"],
                        threads=threads, on_error=p["on_error"])


def _study_job(member: dict, threads: int) -> dict:
    from adaptlab.studies import run_job

    return run_job(member["rule"], json.loads(member["params"]["spec"]), member["input"], member["params"],
                   member["out_dir"], threads)


# rule -> what runs one member of it; every other rule is a study rule (adaptlab.studies.run_job)
JOBS: dict[str, Callable[[dict, int], dict]] = {"finetune": _finetune_job}


def _finetune_fuse_key(member: dict) -> str | None:
    from adaptlab.runner import finetune_fuse_key

    return finetune_fuse_key(json.loads(member["params"]["run"]), member["input"]["model"], member["input"]["data"])


def _finetune_fused(members: list[dict], threads: int) -> None:
    from adaptlab.runner import run_finetune_fused

    p, i = members[0]["params"], members[0]["input"]
    run_finetune_fused([json.loads(m["params"]["run"]) for m in members], i["model"], i["data"],
                       [m["out_dir"] for m in members], device=p["device"], threads=threads, on_error=p["on_error"])


# rule -> (the key members must share to train fused, None: never; what trains such a group). Study rules: their
# run module's FUSED (rule -> (key of a spec, job(specs, inputs, params, run directories, threads))).
FUSERS: dict[str, tuple[Callable[[dict], str | None], Callable[[list[dict], int], None]]] = {
    "finetune": (_finetune_fuse_key, _finetune_fused),
}


def _fuser(rule: str):
    if rule in FUSERS:
        return FUSERS[rule]
    from adaptlab.studies import study_run_module

    fused = getattr(study_run_module(rule), "FUSED", {}).get(rule)
    if fused is None:
        return None
    key, job = fused
    return (lambda m: key(json.loads(m["params"]["spec"])),
            lambda ms, threads: job([json.loads(m["params"]["spec"]) for m in ms], [m["input"] for m in ms],
                                    [m["params"] for m in ms], [m["out_dir"] for m in ms], threads))


def fused_groups(members: list[dict]) -> tuple[list[tuple[Callable, list[dict]]], list[dict]]:
    """The groups of two or more members that can train fused (``FUSERS``: same rule and key), each with the
    function that trains it, and the rest."""
    groups: dict[tuple, list[dict]] = {}
    train: dict[str, Callable] = {}
    rest = []
    for m in members:
        fuser = _fuser(m["rule"])
        key = fuser[0](m) if fuser else None
        if key is None:
            rest.append(m)
        else:
            groups.setdefault((m["rule"], key), []).append(m)
            train[m["rule"]] = fuser[1]
    fused = [(train[rule], g) for (rule, _), g in groups.items() if len(g) > 1]
    rest += [m for g in groups.values() if len(g) == 1 for m in g]
    return fused, rest


def run_member(member: dict, threads: int) -> dict:
    """One run, exactly as its own job would run it (``member``: rule, out_dir, input, params, log)."""
    return JOBS.get(member["rule"], _study_job)(member, threads)


def run_pack(members: list[dict], threads: int, fuse: bool = False) -> None:
    """Train every member, each inside its own job log: with ``fuse``, the groups that can train fused first (one
    batched model per group, their logs written together), then the rest one by one. A member (or fused group)
    that raises does not stop the others: the pack fails at the end, naming them, and its retry restores the
    finished members. A stop signal stops the pack at once (exit 75: a retry resumes)."""
    from adaptlab.joblog import job_log

    groups, rest = fused_groups(members) if fuse else ([], members)
    failed = []
    for train, group in [*groups, *((None, [m]) for m in rest)]:
        try:
            with job_log(*[m["log"] for m in group]):
                if train is None:
                    run_member(group[0], threads)
                else:
                    print(f"adaptlab: {len(group)} runs of {group[0]['rule']} train fused: "
                          f"{', '.join(m['out_dir'] for m in group)}")
                    train(group, threads)
        except SystemExit as stop:
            if stop.code == EXIT_PREEMPTED:
                raise
            failed += [(m["out_dir"], f"exit {stop.code}") for m in group]
        except Exception as err:  # noqa: BLE001 - the other members go on; reported below
            failed += [(m["out_dir"], f"{type(err).__name__}: {err}") for m in group]
    if failed:
        lines = "\n".join(f"  {out}: {why} (see its job.log)" for out, why in failed)
        print(f"adaptlab pack: {len(failed)} of {len(members)} runs raised:\n{lines}", file=sys.stderr)
        raise SystemExit(1)
