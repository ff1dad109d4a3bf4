# Study 2, preconditioned attention (adaptlab.precond): phase (pretrain from scratch | finetune from the study
# backbone) × arm (attention config) × seed, each probing kappa of its attention heads, then one interleaved
# timing run of all arms. `snakemake precond_runs` runs the study alone.
from adaptlab.precond import TIMING_RUN

PRECOND = STUDY_SPECS["precond"]
PRECOND_TRAIN = [r for r in PRECOND if r != TIMING_RUN]


def precond_inputs(wc):
    spec = study_spec("precond", "train")(wc)
    out = {"data": dataset_file(spec["dataset"])}
    if wc.phase == "finetune":
        out["model"] = backbone_file(spec["backbone"])
    return out


rule precond_train:
    input:
        unpack(precond_inputs),
    output:
        summary=study_run_dir("precond", "train") + "/summary.parquet",
    log:
        job_log("precond", "train"),
    params:
        code=code_version(study_run_dir("precond", "train") + "/summary.parquet", "precond"),
        spec=study_params("precond", "train"),
        device=CFG["device"],
    wildcard_constraints:
        phase="pretrain|finetune",
        arm=NAME,
    threads: CFG["threads"]["finetune"]
    group:
        "precond"
    script:
        "../workflow/scripts/study_run.py"


# After the training runs, so that it competes with as few of this study's jobs as possible for the cores.
rule precond_timing:
    input:
        [summary_file(r) for r in PRECOND_TRAIN],
    output:
        summary=summary_file(TIMING_RUN),
    log:
        job_log("precond", "timing"),
    params:
        code=code_version(summary_file(TIMING_RUN), "precond"),
        spec=lambda wc: stable_json(PRECOND[TIMING_RUN]),
    threads: PRECOND[TIMING_RUN]["timing"]["threads"] if PRECOND else 1
    script:
        "../workflow/scripts/study_run.py"


rule precond_runs:
    input:
        [summary_file(r) for r in PRECOND],


# `precond.pack: N`: up to N training runs of one phase in one job (rules/packs.smk)
packable(rules.precond_train, {r: summary_file(r) for r in PRECOND_TRAIN}, by=("phase",),
         size=lambda wc: CFG["precond"]["pack"])
