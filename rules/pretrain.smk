# Pretraining: a timm VisionTransformer trained from scratch on the source dataset, or (init: file)
# timm weights loaded from a local file. Output: the backbone every finetuning run starts from.


rule pretrain:
    input:
        data=[dataset_file(CFG["pretrain"]["dataset"])] if CFG["pretrain"]["init"] == "scratch" else [],
    output:
        model=RESULTS + "/pretrain/model.safetensors",
        summary=RESULTS + "/pretrain/summary.parquet",
        steps=RESULTS + "/pretrain/steps.parquet",
    params:
        spec=stable_json(pretrain_spec(CFG)),
        device=CFG["device"],
    threads: CFG["threads"]["pretrain"]
    script:
        "../workflow/scripts/pretrain.py"
