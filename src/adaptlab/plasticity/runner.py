"""The plasticity analysis and linear-probing runs: config in, Parquet records out (called by the Snakemake scripts)."""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import torch

from adaptlab import records
from adaptlab.data.store import load_dataset
from adaptlab.models.vit import create_vit, load_model_weights
from adaptlab.plasticity import analysis_run_id, linear_probe_run_id
from adaptlab.plasticity.analysis import analyse, paired_indices
from adaptlab.plasticity.linear_probe import features, linear_probe
from adaptlab.plasticity.tables import RAW_TABLES, SUMMARY_FIELDS
from adaptlab.runner import error_text, start_run, summary_row
from adaptlab.train.tasks import ImageClassification


def _backbone(spec: dict, weights: str | Path, device) -> torch.nn.Module:
    model = create_vit(spec["model"], num_classes=0)
    load_model_weights(model, weights, skip_head=True)
    return model.to(device).eval()


def _task(spec: dict, model, data_path, device) -> ImageClassification:
    return ImageClassification(load_dataset(data_path), model.patch_embed.img_size[0], device, seed=0,
                               mean=spec["model"]["mean"], std=spec["model"]["std"])


def _identity(run_id: str, kind: str, spec: dict) -> dict:
    return {"run_id": run_id, "kind": kind, "study": "plasticity", "grid": None, "backbone": spec["backbone"],
            "dataset": spec["dataset"], "seed": 0, "lr": None, "optimizer": None, "trainable": None}


def _write(out_dir: Path, row: dict) -> dict:
    for f in SUMMARY_FIELDS:
        row.setdefault(f.name, None)
    return records.write_run(out_dir, row, extra_fields=SUMMARY_FIELDS)


def run_analysis(spec: dict, weights, source_path, target_path, out_dir, *, device: str = "auto",
                 threads: int = 1) -> dict:
    """Plasticity of every component of every layer on (source test i, target test i) pairs; writes
    ``plasticity_probe.parquet`` and ``summary.parquet``. ``spec``: backbone, dataset, model, and the
    ``plasticity`` section's n_pairs, fc2_input, radius, batch_size."""
    out_dir, dev, t0 = start_run(out_dir, threads, device)
    run_id = analysis_run_id(spec["backbone"], spec["dataset"])
    model = _backbone(spec, weights, dev)
    source, target = _task(spec, model, source_path, dev), _task(spec, model, target_path, dev)
    i_src, i_tgt = paired_indices(len(source.labels("test")), len(target.labels("test")), spec["n_pairs"])
    rows, stats = analyse(model, source.inputs("test", i_src), target.inputs("test", i_tgt),
                          fc2_input=spec["fc2_input"], radius=spec["radius"], batch_size=spec["batch_size"])
    table = pa.Table.from_pylist([{"run_id": run_id, "backbone": spec["backbone"], "dataset": spec["dataset"], **r}
                                  for r in rows], schema=RAW_TABLES["plasticity_probe"])
    records.write_table(table, out_dir / "plasticity_probe.parquet")
    row = summary_row(_identity(run_id, "plasticity_analysis", spec), {"steps": 0}, model, None, dev, spec,
                      time.perf_counter() - t0, status="ok")
    row.update(radius=stats["radius"], n_tokens=stats["n_tokens"], n_pairs=stats["n_pairs"])
    return _write(out_dir, row)


def run_linear_probe(spec: dict, weights, data_path, out_dir, *, device: str = "auto", threads: int = 1) -> dict:
    """Logistic regression on frozen last-block features; best_val_acc / test_acc hold the probe's accuracies."""
    out_dir, dev, t0 = start_run(out_dir, threads, device)
    run_id = linear_probe_run_id(spec["backbone"], spec["dataset"])
    model = None
    try:
        model = _backbone(spec, weights, dev)
        task = _task(spec, model, data_path, dev)
        feats = {s: (features(model, task.inputs(s), spec["batch_size"]), task.labels(s).cpu().numpy())
                 for s in ("train", "val", "test")}
        acc = linear_probe(feats["train"], {"val": feats["val"], "test": feats["test"]},
                           max_iter=spec["linear_probe"]["max_iter"], C=spec["linear_probe"]["C"])
    except Exception as err:  # noqa: BLE001 - recorded like a failed finetuning run
        row = summary_row(_identity(run_id, "linear_probe", spec), {"steps": 0}, model, None, dev, spec,
                          time.perf_counter() - t0, status="failed",
                          error=error_text(err))
        return _write(out_dir, row)
    row = summary_row(_identity(run_id, "linear_probe", spec), {"steps": 0}, model, None, dev, spec,
                      time.perf_counter() - t0, status="ok")
    row.update(best_val_acc=acc["val"], test_acc=acc["test"], trainable_params=0)
    return _write(out_dir, row)
