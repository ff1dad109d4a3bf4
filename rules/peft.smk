# Study 3 (peft): the PEFT grid on classification and instance segmentation (adaptlab.peft.study).
# Segmentation data → results/peft/data/<name>.safetensors; a segmentation task with a `source` first trains
# backbone + dense head in full on it (peft/<task>/source); every arm × seed is then one job on the target data.
from adaptlab.peft.study import SOURCE_ARM, runs as peft_runs, spec_json as peft_json

PEFT = peft_runs(CFG)
PEFT_RUN_DIR = RESULTS + "/runs/peft/{ptask}/{arm}/seed{seed}"
PEFT_SOURCE_DIR = RESULTS + "/runs/peft/{ptask}/" + SOURCE_ARM


wildcard_constraints:
    ptask=NAME,
    arm=r"[A-Za-z][A-Za-z0-9_.+-]*",
    segdata=NAME,


def peft_seg_file(name):
    return f"{RESULTS}/peft/data/{name}.safetensors"


def peft_spec(rid):
    if rid not in PEFT:
        raise WorkflowError(f"{rid} is not a run of the peft section")
    return PEFT[rid]


def peft_data(spec):
    if spec["task"]["kind"] == "classification":
        return dataset_file(spec["dataset"])
    return peft_seg_file(spec["dataset"])


rule peft_seg_data:
    output:
        RESULTS + "/peft/data/{segdata}.safetensors",
    params:
        spec=lambda wc: stable_json(CFG["peft"]["seg_datasets"][wc.segdata]),
    threads: 1
    script:
        "../workflow/scripts/peft_seg_data.py"


rule peft_source:
    input:
        backbone=lambda wc: backbone_file(peft_spec(f"peft/{wc.ptask}/{SOURCE_ARM}")["backbone"]),
        data=lambda wc: peft_data(peft_spec(f"peft/{wc.ptask}/{SOURCE_ARM}")),
    output:
        model=PEFT_SOURCE_DIR + "/model.safetensors",
        summary=PEFT_SOURCE_DIR + "/summary.parquet",
    params:
        spec=lambda wc: peft_json(peft_spec(f"peft/{wc.ptask}/{SOURCE_ARM}")),
        device=CFG["device"],
    threads: CFG.get("peft", {}).get("threads", 1)
    script:
        "../workflow/scripts/peft_run.py"


def peft_run_inputs(wc):
    spec = peft_spec(f"peft/{wc.ptask}/{wc.arm}/seed{wc.seed}")
    out = {"backbone": backbone_file(spec["backbone"]), "data": peft_data(spec)}
    if spec["task"]["kind"] == "segmentation" and spec["task"]["source"]:
        out["source"] = f"{RESULTS}/runs/peft/{wc.ptask}/{SOURCE_ARM}/model.safetensors"
    return out


rule peft_run:
    input:
        unpack(peft_run_inputs),
    output:
        summary=PEFT_RUN_DIR + "/summary.parquet",
        steps=PEFT_RUN_DIR + "/steps.parquet",
    params:
        spec=lambda wc: peft_json(peft_spec(f"peft/{wc.ptask}/{wc.arm}/seed{wc.seed}")),
        device=CFG["device"],
        on_error=CFG["finetune"]["on_error"],
    threads: CFG.get("peft", {}).get("threads", 1)
    group:
        "peft"
    script:
        "../workflow/scripts/peft_run.py"


rule peft_runs:
    input:
        [summary_file(r) for r in PEFT],
