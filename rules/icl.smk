# Study 4, the in-context-learning testbed (adaptlab.icl): unimodal runs (positional scheme × K × seed) and
# multimodal stage-2 runs (arm × K2 × seed) whose pretrained arm starts from a unimodal run's weights.
from adaptlab.icl.study import MODEL_NAME as ICL_MODEL_NAME, specs as icl_specs

ICL = icl_specs(CFG)
ICL_UNI_DIR = RESULTS + "/runs/icl/uni/{scheme}/K{K}/seed{seed}"
ICL_MM_DIR = RESULTS + "/runs/icl/mm/{arm}/K{K2}/seed{seed}"


def icl_params(rid):
    if rid not in ICL:
        raise WorkflowError(f"{rid} is not a run of the icl section")
    return stable_json(ICL[rid])


def icl_stage1(wc):
    stage1 = ICL[f"icl/mm/{wc.arm}/K{wc.K2}/seed{wc.seed}"]["stage1"]
    return [f"{RESULTS}/runs/{stage1}/{ICL_MODEL_NAME}"] if stage1 else []


rule icl_uni:
    output:
        summary=ICL_UNI_DIR + "/summary.parquet",
        steps=ICL_UNI_DIR + "/steps.parquet",
        evals=ICL_UNI_DIR + "/icl_eval.parquet",
        model=ICL_UNI_DIR + "/" + ICL_MODEL_NAME,
    wildcard_constraints:
        scheme="ape|rope|none",
        K=r"\d+",
    params:
        spec=lambda wc: icl_params(f"icl/uni/{wc.scheme}/K{wc.K}/seed{wc.seed}"),
        device=CFG["device"],
    threads: CFG.get("icl", {}).get("threads", 1)
    group:
        "icl"
    script:
        "../workflow/scripts/icl_run.py"


rule icl_mm:
    input:
        init=icl_stage1,
    output:
        summary=ICL_MM_DIR + "/summary.parquet",
        steps=ICL_MM_DIR + "/steps.parquet",
        evals=ICL_MM_DIR + "/icl_eval.parquet",
    wildcard_constraints:
        arm="pretrained|scratch",
        K2=r"\d+",
    params:
        spec=lambda wc: icl_params(f"icl/mm/{wc.arm}/K{wc.K2}/seed{wc.seed}"),
        device=CFG["device"],
    threads: CFG.get("icl", {}).get("threads", 1)
    group:
        "icl"
    script:
        "../workflow/scripts/icl_run.py"


rule icl_runs:
    input:
        [summary_file(r) for r in ICL],
