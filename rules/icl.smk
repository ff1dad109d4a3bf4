# Study 4, the in-context-learning testbed (adaptlab.icl): unimodal runs (positional scheme × K × seed) and
# multimodal stage-2 runs (arm × K2 × seed) whose pretrained arm starts from a unimodal run's weights.
from adaptlab.icl import MODEL_NAME as ICL_MODEL_NAME


def icl_stage1(wc):
    stage1 = study_spec("icl", "mm")(wc)["stage1"]
    return [f"{RESULTS}/runs/{stage1}/{ICL_MODEL_NAME}"] if stage1 else []


rule icl_uni:
    output:
        summary=study_run_dir("icl", "uni") + "/summary.parquet",
        steps=study_run_dir("icl", "uni") + "/steps.parquet",
        evals=study_run_dir("icl", "uni") + "/icl_eval.parquet",
        model=study_run_dir("icl", "uni") + "/" + ICL_MODEL_NAME,
    log:
        job_log("icl", "uni"),
    wildcard_constraints:
        scheme="ape|rope|none",
        K=r"\d+",
    params:
        code=code_version(study_run_dir("icl", "uni") + "/summary.parquet", "icl"),
        spec=study_params("icl", "uni"),
        device=CFG["device"],
        on_error=CFG["finetune"]["on_error"],
    threads: CFG.get("icl", {}).get("threads", 1)
    # stage 1 before stage 2 whenever both are ready: the multimodal runs are the short ones, so they fill the
    # tail instead of leaving a core idle behind the last unimodal pack
    priority: 1
    group:
        "icl"
    script:
        "../workflow/scripts/study_run.py"


rule icl_mm:
    input:
        init=icl_stage1,
    output:
        summary=study_run_dir("icl", "mm") + "/summary.parquet",
        steps=study_run_dir("icl", "mm") + "/steps.parquet",
        evals=study_run_dir("icl", "mm") + "/icl_eval.parquet",
    log:
        job_log("icl", "mm"),
    wildcard_constraints:
        arm="pretrained|scratch",
        K2=r"\d+",
    params:
        code=code_version(study_run_dir("icl", "mm") + "/summary.parquet", "icl"),
        spec=study_params("icl", "mm"),
        device=CFG["device"],
        on_error=CFG["finetune"]["on_error"],
    threads: CFG.get("icl", {}).get("threads", 1)
    group:
        "icl"
    script:
        "../workflow/scripts/study_run.py"


rule icl_runs:
    input:
        [summary_file(r) for r in STUDY_SPECS["icl"]],


# `icl.pack: N`: up to N unimodal runs, and separately N multimodal runs, in one job (rules/packs.smk); with
# `icl.fuse: true` the runs of a pack that share their shapes train as one batched model
for _rule in (rules.icl_uni, rules.icl_mm):
    packable(_rule, {r: summary_file(r) for r in STUDY_SPECS["icl"]}, by=(),
             size=lambda wc: CFG["icl"]["pack"], fuse=lambda wc: CFG["icl"]["fuse"])
