# Study 5 (adaptlab.continual): continual-learning plasticity benchmark, one job per
# grid × benchmark × model × method × seed. `snakemake continual_runs` runs this study alone.
from adaptlab.continual import run_ids as continual_run_ids, run_params as continual_run_params

CONTINUAL_RUNS = continual_run_ids(CFG)
CONTINUAL_DIR = RESULTS + "/runs/continual/{cgrid}/{cbench}/{cmodel}/{cmethod}/seed{seed}"


rule continual_run:
    output:
        summary=CONTINUAL_DIR + "/summary.parquet",
        metrics=CONTINUAL_DIR + "/continual_task_metrics.parquet",
    params:
        spec=lambda wc: continual_run_params(CFG, f"continual/{wc.cgrid}/{wc.cbench}/{wc.cmodel}/{wc.cmethod}/seed{wc.seed}"),
        on_error=CFG["finetune"]["on_error"],
    wildcard_constraints:
        cgrid=NAME,
        cbench=NAME,
        cmodel=NAME,
        cmethod=r"[A-Za-z][A-Za-z0-9_.+-]*",
    threads: CFG.get("continual", {}).get("threads", 1)
    group:
        "continual"
    script:
        "../workflow/scripts/continual.py"


rule continual_runs:
    input:
        [summary_file(r) for r in CONTINUAL_RUNS],
