# Study 1 — plasticity (Odonnat et al.). Per (backbone, downstream dataset) of the study's finetuning grids:
#   1. the plasticity analysis: every component of every block probed on the same embedding outputs of index-paired
#      (source test i, downstream test i) images; per-layer mean ratio, 95 % CI, pairs and theoretical bound;
#   2. the linear-probing baseline on frozen last-block features (the reference of the relative gain).
# The component-wise finetuning grid itself (one component type trains, plus the head) is an ordinary
# finetune grid with `study: plasticity` (rules/finetune.smk); the ablation arms are more such grids.


rule plasticity_analysis:
    input:
        model=lambda wc: backbone_file(wc.backbone),
        source=lambda wc: dataset_file(study_spec("plasticity", "analysis")(wc)["source"]),
        target=lambda wc: dataset_file(wc.dataset),
    output:
        summary=study_run_dir("plasticity", "analysis") + "/summary.parquet",
        layers=study_run_dir("plasticity", "analysis") + "/plasticity_probe.parquet",
    log:
        job_log("plasticity", "analysis"),
    params:
        code=code_version(study_run_dir("plasticity", "analysis") + "/summary.parquet", "plasticity"),
        spec=study_params("plasticity", "analysis"),
        device=CFG["device"],
        on_error=CFG["finetune"]["on_error"],
    threads: CFG["threads"]["finetune"]
    script:
        "../workflow/scripts/study_run.py"


rule linear_probe:
    input:
        model=lambda wc: backbone_file(wc.backbone),
        data=lambda wc: dataset_file(wc.dataset),
    output:
        summary=study_run_dir("plasticity", "linear_probe") + "/summary.parquet",
    log:
        job_log("plasticity", "linear_probe"),
    params:
        code=code_version(study_run_dir("plasticity", "linear_probe") + "/summary.parquet", "plasticity"),
        spec=study_params("plasticity", "linear_probe"),
        device=CFG["device"],
        on_error=CFG["finetune"]["on_error"],
    threads: CFG["threads"]["finetune"]
    script:
        "../workflow/scripts/study_run.py"


rule plasticity_runs:
    """Every run of the study (analysis, linear probes, the finetuning grids with study: plasticity)."""
    input:
        [summary_file(r) for r in STUDY_SPECS["plasticity"]],
        [summary_file(r) for r, spec in RUNS.items() if spec.study == "plasticity"],


# `plasticity.pack: N`: up to N analyses, and separately N linear probes, in one job (rules/packs.smk)
for _rule in (rules.plasticity_analysis, rules.linear_probe):
    packable(_rule, {r: summary_file(r) for r in STUDY_SPECS["plasticity"]}, by=(),
             size=lambda wc: CFG["plasticity"]["pack"])
