# Pretraining, one job per backbone: a timm VisionTransformer trained from scratch on its source dataset, or
# (init: file) timm weights loaded from a local file. Output: the backbone its finetuning runs start from.


def pretrain_data(wc):
    spec = pretrain_spec(CFG, wc.backbone)
    return [dataset_file(spec["dataset"])] if spec["init"] == "scratch" else []


rule pretrain:
    input:
        data=pretrain_data,
    output:
        model=PRETRAIN_DIR + "/model.safetensors",
        summary=PRETRAIN_DIR + "/summary.parquet",
        steps=PRETRAIN_DIR + "/steps.parquet",
    log:
        PRETRAIN_DIR + "/job.log",
    params:
        code=code_version(PRETRAIN_DIR + "/summary.parquet"),
        spec=lambda wc: stable_json(pretrain_spec(CFG, wc.backbone)),
        device=CFG["device"],
    threads: CFG["threads"]["pretrain"]
    script:
        "../workflow/scripts/pretrain.py"
