# Study 1 — plasticity (Odonnat et al.). Per (backbone, downstream dataset) of the study's finetuning grids:
#   1. the plasticity analysis: every component of every block probed on the same embedding outputs of index-paired
#      (source test i, downstream test i) images; per-layer mean ratio, 95 % CI, pairs and theoretical bound;
#   2. the linear-probing baseline on frozen last-block features (the reference of the relative gain).
# The component-wise finetuning grid itself (one component type trains, plus the head) is an ordinary
# finetune grid with `study: plasticity` (rules/finetune.smk); the ablation arms are more such grids.
import adaptlab.plasticity as plasticity

PLASTICITY_RUN_IDS = plasticity.run_ids(CFG)


def plasticity_spec(wc):
    from adaptlab.config import backbone_spec, run_model_config

    return stable_json({**CFG["plasticity"], "backbone": wc.backbone, "dataset": wc.dataset,
                        "source": plasticity.source_dataset(CFG, wc.backbone),
                        "model": run_model_config(backbone_spec(CFG, wc.backbone)["model"])})


rule plasticity_analysis:
    input:
        model=lambda wc: backbone_file(wc.backbone),
        source=lambda wc: dataset_file(plasticity.source_dataset(CFG, wc.backbone)),
        target=lambda wc: dataset_file(wc.dataset),
    output:
        summary=RESULTS + "/runs/" + plasticity.analysis_run_id("{backbone}", "{dataset}") + "/summary.parquet",
        layers=RESULTS + "/runs/" + plasticity.analysis_run_id("{backbone}", "{dataset}") + "/plasticity_probe.parquet",
    params:
        spec=plasticity_spec,
        device=CFG["device"],
    threads: CFG["threads"]["finetune"]
    script:
        "../workflow/scripts/plasticity_analysis.py"


rule linear_probe:
    input:
        model=lambda wc: backbone_file(wc.backbone),
        data=lambda wc: dataset_file(wc.dataset),
    output:
        summary=RESULTS + "/runs/" + plasticity.linear_probe_run_id("{backbone}", "{dataset}") + "/summary.parquet",
    params:
        spec=plasticity_spec,
        device=CFG["device"],
    threads: CFG["threads"]["finetune"]
    script:
        "../workflow/scripts/linear_probe.py"


rule plasticity_runs:
    """Every run of the study (analysis, linear probes, the finetuning grids with study: plasticity)."""
    input:
        [summary_file(r) for r in PLASTICITY_RUN_IDS],
        [summary_file(r) for r, spec in RUNS.items() if spec.study == "plasticity"],
