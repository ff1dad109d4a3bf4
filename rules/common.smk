# Config validation, grid expansion and the input/param functions the rules share.
import os

from snakemake.exceptions import WorkflowError
from snakemake.iocontainers import Wildcards

from adaptlab.aggregate import OVERVIEW_NAME, all_figures, all_tables
from adaptlab.config import (FINETUNE_RUN_ID, ConfigError, RESULTS, expand_runs, pretrain_run_id, pretrain_spec,
                             stable_json, validate_config)
from adaptlab.fingerprint import code_fingerprint
from adaptlab.packs import plan as plan_packs
from adaptlab.records import recorded_fingerprint
from adaptlab.run_state import quarantine_events
from adaptlab.studies import expected_runs, run_id, studies

try:
    # the schema, the cross-references and every study's own check: the same errors as `adaptlab validate`
    CFG = validate_config(config, source=", ".join(map(str, workflow.configfiles)) or "config")
    STUDIES = {s.SECTION: s for s in studies()}
    # every study's runs, expanded once per parse: run id -> spec (its job's params)
    STUDY_SPECS = {name: s.specs(CFG) for name, s in STUDIES.items()}
    # Every run of every study (run id -> study): the aggregate rule waits for each one's summary.parquet.
    EXPECTED = expected_runs(CFG, STUDY_SPECS)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

RUNS = {r.run_id: r for r in expand_runs(CFG)}
NAME = r"[A-Za-z][A-Za-z0-9_-]*"


wildcard_constraints:
    dataset=NAME,
    grid=NAME,
    trainable=NAME,
    optimizer=NAME,
    backbone=NAME,
    lr=r"[0-9.eE+-]+",
    seed=r"\d+",


RUN_DIR = RESULTS + "/runs/" + FINETUNE_RUN_ID
PRETRAIN_DIR = RESULTS + "/runs/" + pretrain_run_id("{backbone}")


def finetune_run(wc):
    """The finetuning run (``RunSpec``) a finetune job's wildcards name."""
    rid = FINETUNE_RUN_ID.format(**dict(wc.items()))
    if rid not in RUNS:
        raise WorkflowError(f"{rid} is not a run of the configured grids")
    return RUNS[rid]


def run_params(wc):
    """Every hyperparameter of one run, so that changing one grid value reruns exactly the runs it touches."""
    return stable_json(finetune_run(wc).as_dict())


def study_run_dir(section, kind):
    """The wildcard path of a study's run directory: its run-id pattern (``Study.RUN_IDS``) under results/runs."""
    return f"{RESULTS}/runs/{STUDIES[section].RUN_IDS[kind]}"


def study_spec(section, kind):
    """An input function: the spec of the ``section`` run of ``kind`` that a job's wildcards name."""
    study, specs = STUDIES[section], STUDY_SPECS[section]

    def spec(wc):
        rid = run_id(study, kind, **dict(wc.items()))
        if rid not in specs:
            raise WorkflowError(f"{rid} is not a run of the {section} section")
        return specs[rid]

    return spec


def study_params(section, kind):
    """A params function: the run's spec as stable JSON, so changing one value reruns exactly the runs it touches."""
    spec = study_spec(section, kind)
    return lambda wc: stable_json(spec(wc))


def code_version(summary, section=None):
    """A params function: the code fingerprint of the job's run (``adaptlab.fingerprint``). ``summary``: the rule's
    summary output (a wildcard pattern); ``section``: the study whose run module the job runs, None for
    pretraining and the finetuning grids. With ``rerun_on_code_change`` it is the current code's, so Snakemake
    reruns exactly the runs whose code changed. Without, it is the one the run recorded in its summary (the
    current one before it has run): a code change reruns nothing, and switching the option on reruns only the
    runs whose code changed since they ran. (A function of the wildcards only: Snakemake does not record params
    that are functions of the output.)"""
    current = code_fingerprint("finetune", None) if section is None else code_fingerprint("run", section)
    if CFG["rerun_on_code_change"]:
        return lambda wildcards: current
    return lambda wildcards: recorded_fingerprint(summary.format(**dict(wildcards.items()))) or current


def job_log(section, kind):
    """The log file of a study's job: in the run's own directory, next to its records."""
    return study_run_dir(section, kind) + "/job.log"


def dataset_file(name):
    return f"{RESULTS}/data/{name}.safetensors"


def backbone_file(name):
    """The pretrained weights of a backbone (the output of its pretrain job)."""
    return f"{RESULTS}/runs/{pretrain_run_id(name)}/model.safetensors"


def summary_file(run_id):
    return f"{RESULTS}/runs/{run_id}/summary.parquet"


# --- run packs (adaptlab.packs; rules/packs.smk writes one rule per pack) --------------------------------------
PACKABLE = []  # (rule, members: run id -> summary path, by, size(wildcards), fuse(wildcards)), filled by the rule files


def packable(rule, summaries, by, size, fuse=lambda wc: False):
    """Let ``rule`` (``rules.<name>``) run its jobs in packs. ``summaries``: run id -> the summary path of each run
    the rule may make (those its output does not match are not its own); ``by``: the wildcards a pack's members
    share; ``size(wc)``/``fuse(wc)``: the pack size (1: the rule's own job) and whether the pack trains fused."""
    PACKABLE.append((rule.rule, summaries, tuple(by), size, fuse))


def _paths(value):
    """A named input as the job's script would see it: one path, or a list of paths (e.g. an empty one)."""
    return str(value) if isinstance(value, str) else [str(v) for v in value]


def member_job(rule, summary):
    """What one run of ``rule`` (a ``Rule``) needs as a pack member: its wildcards applied to the rule's input,
    output and log, as the rule's own job would have them (Snakemake's own expansion: Rule.get_wildcards and
    expand_*, internals of Snakemake 9; tests/test_packs.py fails if a release changes them), and the scheduling
    priority its own job would have (the rule's ``priority:``), kept apart from the job: it is not a param. Its
    params are ``member_params``: evaluated only for a pack Snakemake schedules, not at every parse."""
    wc = Wildcards(fromdict=rule.get_wildcards(summary))
    inp = rule.expand_input(wc)[0]
    job = {"rule": rule.name, "out_dir": os.path.dirname(summary), "log": str(rule.expand_log(wc)[0]),
           "input": {k: _paths(v) for k, v in inp.items()}, "output": [str(o) for o in rule.expand_output(wc)[0]]}
    return job, rule.expand_priority(wc, inp, 1)


def member_params(rule, summary):
    """The params one run of ``rule`` would have in its own job (code_version reads its recorded summary)."""
    wc = Wildcards(fromdict=rule.get_wildcards(summary))
    params = rule.expand_params(wc, rule.expand_input(wc)[0], rule.expand_output(wc)[0], None)[0]
    return {k: v for k, v in params.items()}


def pack_members(rule, members):
    """A params function: the pack's members, each with its params (``member_params``)."""
    return lambda wildcards: stable_json([{**m, "params": member_params(rule, os.path.join(m["out_dir"], "summary.parquet"))}
                                          for m in members])


def run_packs():
    """Every pack of every packable rule (``adaptlab.packs.plan``), each with its members' jobs and its priority:
    its highest member's (a pack holding a run that goes first goes first)."""
    out = []
    for rule, summaries, by, size, fuse in PACKABLE:
        members = {}
        for rid, path in summaries.items():
            if rule.is_producer(path):
                members[rid] = rule.get_wildcards(path)
        for pack in plan_packs(rule.name, members, by, size, fuse):
            jobs, priorities = zip(*(member_job(rule, summary_file(rid)) for rid in pack.members))
            out.append((pack, list(jobs), max(priorities)))
    return out
