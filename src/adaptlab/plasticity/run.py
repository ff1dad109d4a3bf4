"""The plasticity analysis and linear-probing runs: config in, Parquet records out (called by the Snakemake scripts)."""
from __future__ import annotations

from pathlib import Path

import torch

from adaptlab.data.store import load_dataset
from adaptlab.models.vit import create_vit, load_model_weights
from adaptlab.plasticity import RUN_IDS, SECTION
from adaptlab.plasticity.analysis import analyse, paired_indices
from adaptlab.plasticity.linear_probe import features, linear_probe
from adaptlab.plasticity.tables import RAW_TABLES, SUMMARY_FIELDS
from adaptlab.runner import Run, execute
from adaptlab.train.tasks import ImageClassification


def _backbone(spec: dict, weights: str | Path, device) -> torch.nn.Module:
    model = create_vit(spec["model"], num_classes=0)
    load_model_weights(model, weights, skip_head=True)
    return model.to(device).eval()


def _task(spec: dict, model, data_path, device) -> ImageClassification:
    return ImageClassification(load_dataset(data_path), model.patch_embed.img_size[0], device, seed=0,
                               mean=spec["model"]["mean"], std=spec["model"]["std"])


# the summary's ``kind`` of each run kind
RUN_KINDS = {"analysis": "plasticity_analysis", "linear_probe": "linear_probe"}


def _execute(kind: str, spec: dict, out_dir, body, *, device: str, threads: int, on_error: str, inputs) -> dict:
    run_id = RUN_IDS[kind].format(backbone=spec["backbone"], dataset=spec["dataset"])
    identity = {"run_id": run_id, "kind": RUN_KINDS[kind], "study": SECTION, "grid": None, "backbone": spec["backbone"], "dataset": spec["dataset"], "seed": 0,
                "lr": None, "optimizer": None, "trainable": None}

    def with_nulls(run: Run) -> None:
        run.extra.update({f.name: None for f in SUMMARY_FIELDS})
        run.status = "ok"
        body(run, run_id)

    return execute(identity, spec, out_dir, with_nulls, steps_planned=0, device=device, threads=threads,
                   on_error=on_error, extra_fields=SUMMARY_FIELDS, inputs=inputs)


def run_analysis(spec: dict, weights, source_path, target_path, out_dir, *, device: str = "auto",
                 threads: int = 1, on_error: str = "record") -> dict:
    """Plasticity of every component of every layer on (source test i, target test i) pairs; writes
    ``plasticity_probe.parquet`` and ``summary.parquet``. ``spec``: backbone, dataset, model, and the
    ``plasticity`` section's n_pairs, fc2_input, radius, batch_size."""

    def body(run: Run, run_id: str) -> None:
        run.model = model = _backbone(spec, weights, run.device)
        source, target = _task(spec, model, source_path, run.device), _task(spec, model, target_path, run.device)
        i_src, i_tgt = paired_indices(len(source.labels("test")), len(target.labels("test")), spec["n_pairs"])
        rows, stats = analyse(model, source.inputs("test", i_src), target.inputs("test", i_tgt),
                              fc2_input=spec["fc2_input"], radius=spec["radius"], batch_size=spec["batch_size"])
        run.tables["plasticity_probe"] = ([{"run_id": run_id, "backbone": spec["backbone"],
                                            "dataset": spec["dataset"], **r} for r in rows],
                                          RAW_TABLES["plasticity_probe"])
        run.extra.update(radius=stats["radius"], n_tokens=stats["n_tokens"], n_pairs=stats["n_pairs"])

    return _execute("analysis", spec, out_dir, body, device=device, threads=threads, on_error=on_error,
                    inputs=[weights, source_path, target_path])


def run_linear_probe(spec: dict, weights, data_path, out_dir, *, device: str = "auto", threads: int = 1,
                     on_error: str = "record") -> dict:
    """Logistic regression on frozen last-block features; best_val_acc / test_acc hold the probe's accuracies."""

    def body(run: Run, run_id: str) -> None:
        run.model = model = _backbone(spec, weights, run.device)
        task = _task(spec, model, data_path, run.device)
        feats = {s: (features(model, task.inputs(s), spec["batch_size"]), task.labels(s).cpu().numpy())
                 for s in ("train", "val", "test")}
        acc = linear_probe(feats["train"], {"val": feats["val"], "test": feats["test"]},
                           max_iter=spec["linear_probe"]["max_iter"], C=spec["linear_probe"]["C"])
        run.extra.update(best_val_acc=acc["val"], test_acc=acc["test"], trainable_params=0)

    return _execute("linear_probe", spec, out_dir, body, device=device, threads=threads, on_error=on_error,
                    inputs=[weights, data_path])


# rule -> the job: (spec, named inputs, params, run directory, threads); workflow/scripts/study_run.py calls it
RULES = {
    "plasticity_analysis": lambda spec, i, p, out, threads: run_analysis(
        spec, i["model"], i["source"], i["target"], out, device=p["device"], threads=threads, on_error=p["on_error"]),
    "linear_probe": lambda spec, i, p, out, threads: run_linear_probe(
        spec, i["model"], i["data"], out, device=p["device"], threads=threads, on_error=p["on_error"]),
}
