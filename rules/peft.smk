# Study 3 (peft): the PEFT grid on classification and instance segmentation (adaptlab.peft).
# Segmentation data → results/peft/data/<name>.safetensors; a segmentation task with a `source` first trains
# backbone + dense head in full on it (peft/<task>/source); every arm × seed is then one job on the target data.


wildcard_constraints:
    ptask=NAME,
    arm=r"[A-Za-z][A-Za-z0-9_.+-]*",
    segdata=NAME,


def peft_seg_file(name):
    return f"{RESULTS}/peft/data/{name}.safetensors"


def peft_inputs(kind):
    """An input function: the backbone, the task's data and (arms of a segmentation task with a source stage) the
    source stage's weights."""
    get = study_spec("peft", kind)

    def inputs(wc):
        spec = get(wc)
        seg = spec["task"]["kind"] == "segmentation"
        out = {"backbone": backbone_file(spec["backbone"]),
               "data": peft_seg_file(spec["dataset"]) if seg else dataset_file(spec["dataset"])}
        if kind == "arm" and seg and spec["task"]["source"]:
            out["source"] = study_run_dir("peft", "source").format(ptask=wc.ptask) + "/model.safetensors"
        return out

    return inputs


rule peft_seg_data:
    output:
        RESULTS + "/peft/data/{segdata}.safetensors",
    log:
        RESULTS + "/logs/peft_seg_data/{segdata}.log",
    params:
        spec=lambda wc: stable_json(CFG["peft"]["seg_datasets"][wc.segdata]),
    threads: 1
    script:
        "../workflow/scripts/peft_seg_data.py"


rule peft_source:
    input:
        unpack(peft_inputs("source")),
    output:
        model=study_run_dir("peft", "source") + "/model.safetensors",
        summary=study_run_dir("peft", "source") + "/summary.parquet",
    log:
        job_log("peft", "source"),
    params:
        code=code_version(study_run_dir("peft", "source") + "/summary.parquet", "peft"),
        spec=study_params("peft", "source"),
        device=CFG["device"],
    threads: CFG.get("peft", {}).get("threads", 1)
    script:
        "../workflow/scripts/study_run.py"


rule peft_run:
    input:
        unpack(peft_inputs("arm")),
    output:
        summary=study_run_dir("peft", "arm") + "/summary.parquet",
        steps=study_run_dir("peft", "arm") + "/steps.parquet",
    log:
        job_log("peft", "arm"),
    params:
        code=code_version(study_run_dir("peft", "arm") + "/summary.parquet", "peft"),
        spec=study_params("peft", "arm"),
        device=CFG["device"],
        on_error=CFG["finetune"]["on_error"],
    threads: CFG.get("peft", {}).get("threads", 1)
    group:
        "peft"
    script:
        "../workflow/scripts/study_run.py"


rule peft_runs:
    input:
        [summary_file(r) for r in STUDY_SPECS["peft"]],


# `peft.pack: N`: up to N arm runs of one task in one job (rules/packs.smk)
packable(rules.peft_run, {r: summary_file(r) for r in STUDY_SPECS["peft"]}, by=("ptask",),
         size=lambda wc: CFG["peft"]["pack"])
