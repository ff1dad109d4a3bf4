# Study 5 (adaptlab.continual): continual-learning plasticity benchmark, one job per
# grid × benchmark × model × method × seed. `snakemake continual_runs` runs this study alone.
from adaptlab.continual import layout as continual_layout


def continual_inputs(wc):
    """The prepared dataset of a benchmark with inputs: dataset (none for generated inputs)."""
    bench = study_spec("continual", "run")(wc)["benchmark"]
    return {"data": dataset_file(bench["dataset"])} if bench["inputs"] == "dataset" else {}


rule continual_run:
    input:
        unpack(continual_inputs),
    output:
        summary=study_run_dir("continual", "run") + "/summary.parquet",
        metrics=study_run_dir("continual", "run") + "/continual_task_metrics.parquet",
    log:
        job_log("continual", "run"),
    params:
        code=code_version(study_run_dir("continual", "run") + "/summary.parquet", "continual"),
        spec=study_params("continual", "run"),
        on_error=CFG["finetune"]["on_error"],
    wildcard_constraints:
        cgrid=NAME,
        cbench=NAME,
        cmodel=NAME,
        cmethod=r"[A-Za-z][A-Za-z0-9_.+-]*",
    threads: CFG.get("continual", {}).get("threads", 1)
    # longest first: a ViT run costs ~3 MLP runs on the CPU, so the ViT jobs start first and the short MLP jobs
    # fill the tail instead of one ViT pack running alone at the end
    priority: lambda wc: 1 if study_spec("continual", "run")(wc)["model"]["kind"] == "vit" else 0
    group:
        "continual"
    script:
        "../workflow/scripts/study_run.py"


rule continual_runs:
    input:
        [summary_file(r) for r in STUDY_SPECS["continual"]],


# `continual.pack: N` (a grid's own `pack` in its place): up to N runs of one grid and benchmark in one job
# (rules/packs.smk); with `continual.fuse: true` (or the grid's `fuse`) the runs of a pack that share a loss
# (continual.run.fuse_key) train as one batched model
packable(rules.continual_run, {r: summary_file(r) for r in STUDY_SPECS["continual"]}, by=("cgrid", "cbench"),
         size=lambda wc: continual_layout(CFG, wc["cgrid"], "pack"),
         fuse=lambda wc: continual_layout(CFG, wc["cgrid"], "fuse"))
