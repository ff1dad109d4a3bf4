# Finetuning grids: datasets × trainable set × optimizer × lr × seed, one job and one run directory each.
# A new head always trains; SGD-momentum or AdamW over the trainable parameters only; cosine schedule with
# warmup; grad-norm clipping; val every `eval_every` steps; test at the best-val step.
# Small jobs share a group, so a cluster submission runs many of them in series on one GPU.


rule finetune:
    input:
        model=lambda wc: backbone_file(finetune_run(wc).backbone),
        data=lambda wc: dataset_file(wc.dataset),
    output:
        summary=RUN_DIR + "/summary.parquet",
        steps=RUN_DIR + "/steps.parquet",
    log:
        RUN_DIR + "/job.log",
    params:
        code=code_version(RUN_DIR + "/summary.parquet"),
        run=run_params,
        device=CFG["device"],
        on_error=CFG["finetune"]["on_error"],
    threads: CFG["threads"]["finetune"]
    group:
        "finetune"
    script:
        "../workflow/scripts/finetune.py"


# `pack: N` on a grid: up to N of its runs on one dataset train in one job (rules/packs.smk); `fuse: true` trains
# them as one batched model.
packable(rules.finetune, {rid: summary_file(rid) for rid in RUNS}, by=("grid", "dataset"),
         size=lambda wc: CFG["finetune"]["grids"][wc["grid"]]["pack"],
         fuse=lambda wc: CFG["finetune"]["grids"][wc["grid"]]["fuse"])
