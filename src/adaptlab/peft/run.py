"""One run of the PEFT grid, or the source pretraining of a segmentation task: build, adapt, fit, measure."""
from __future__ import annotations

import time

import torch

from adaptlab.config import config_hash
from adaptlab.data.store import load_dataset
from adaptlab.models.vit import count_parameters, create_vit, load_model_weights, save_model_weights
from adaptlab.peft import METRIC, SECTION, SOURCE_ARM, SUMMARY_FIELDS
from adaptlab.peft.dense_head import InstanceSegmenter
from adaptlab.peft.head_config import head_config
from adaptlab.peft.lora import merged_copy
from adaptlab.peft.methods import TASK_PARTS, added_params_formula, apply_method, save_trainable
from adaptlab.peft.seg_data import load_seg_dataset
from adaptlab.peft.seg_task import InstanceSegmentation
from adaptlab.runner import Run, execute
from adaptlab.train.loop import fit
from adaptlab.train.tasks import ImageClassification


def build_task_model(spec: dict, data, backbone_path, source_path, device):
    """(model, task) of a run: the backbone from ``backbone_path``; a segmentation model's dense head from the
    source run's weights when given."""
    kind, mcfg, cfg = spec["task"]["kind"], spec["model"], spec["train"]
    torch.manual_seed(spec["seed"])  # new heads depend on the run's seed
    if kind == "classification":
        model = create_vit(mcfg, data.num_classes)
        load_model_weights(model, backbone_path, skip_head=True)
        task = ImageClassification(data, model.patch_embed.img_size[0], device, spec["seed"], mean=mcfg["mean"],
                                   std=mcfg["std"], eval_batch_size=cfg["eval_batch_size"], hflip=cfg["hflip"])
        return model, task
    backbone = create_vit(mcfg, 0)
    model = InstanceSegmenter(backbone, data.num_classes, head_config(spec["head"]))
    if source_path:
        load_model_weights(model, source_path)
    else:
        load_model_weights(backbone, backbone_path, skip_head=True)
    task = InstanceSegmentation(data, backbone.patch_embed.img_size[0], device, spec["seed"], mean=mcfg["mean"],
                                std=mcfg["std"], eval_batch_size=cfg["eval_batch_size"], hflip=cfg["hflip"])
    return model, task


def latency_ms(model, x, reps: int = 5) -> float:
    """Median wall time of one eval forward of the batch ``x`` (after one warm-up)."""
    was = model.training
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    model.train(was)
    return 1000 * sorted(times)[len(times) // 2]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def run_peft(spec: dict, backbone_path, data_path, out_dir, *, source_path=None, device: str = "auto",
             threads: int = 1, on_error: str = "record") -> dict:
    """One run of the grid (or, with arm ``source``, the full source pretraining of a segmentation task)."""
    cfg, arm, kind = spec["train"], spec["arm"], spec["task"]["kind"]
    is_source = arm["label"] == SOURCE_ARM
    identity = {"run_id": spec["run_id"], "kind": "peft_source" if is_source else "peft", "study": SECTION,
                "grid": spec["task"]["name"], "backbone": spec["backbone"], "dataset": spec["dataset"],
                "seed": spec["seed"], "lr": cfg["lr"], "optimizer": cfg["optimizer"], "trainable": arm["label"]}

    def body(run: Run) -> None:
        extra = run.extra
        extra.update({f.name: None for f in SUMMARY_FIELDS})
        extra.update(task=spec["task"]["name"], task_kind=kind, arm=arm["label"], method=arm["method"],
                     n_adapters=arm.get("n_adapters"), reduction=arm.get("reduction"), adapter_init=arm.get("init"),
                     lora_rank=arm.get("rank"), lora_alpha=arm.get("alpha"), lora_targets=arm.get("targets"),
                     metric_name=METRIC[kind])
        data = load_dataset(data_path) if kind == "classification" else load_seg_dataset(data_path)
        model, task = build_task_model(spec, data, backbone_path, None if is_source else source_path, run.device)
        base_total = sum(p.numel() for p in model.parameters())
        formula = added_params_formula(model, arm)
        dense = TASK_PARTS[kind]["dense"] if spec["task"]["train_dense_head"] else []
        run.model = train_model = apply_method(model, arm, kind, extra_trainable=dense)
        trainable, total = count_parameters(train_model)
        extra.update(added_params=total - base_total, added_params_formula=formula,
                     trainable_pct=100.0 * trainable / total)
        run.result = result = fit(train_model, task, cfg, run.out_dir, device=run.device, config_id=config_hash(spec))
        metric = METRIC[kind]
        extra.update(val_metric=result.best_val.get(metric), train_seconds=result.elapsed_seconds)
        if result.test:
            extra.update(test_metric=result.test.get(metric), test_mask_ap=result.test.get("mask_ap"),
                         test_mask_ap50=result.test.get("mask_ap50"), test_miou=result.test.get("miou"))
        if is_source:
            save_model_weights(model, run.out_dir / "model.safetensors")
            return
        save_trainable(train_model, run.out_dir / "adapter.safetensors", arm)
        xb = task._prepare(torch.from_numpy(data.split("val")[0][:spec["latency_batch"]].copy()).to(run.device))
        extra["latency_ms"] = latency_ms(train_model, xb)
        if arm["method"] == "lora":
            merged = merged_copy(train_model)
            extra["latency_merged_ms"] = latency_ms(merged, xb)
            with torch.no_grad():
                train_model.eval(), merged.eval()
                extra["merge_max_abs_diff"] = (_first(merged(xb)) - _first(train_model(xb))).abs().max().item()

    # the source stage's weights are the arms' input: it is recorded when it fails, then raises
    return execute(identity, spec, out_dir, body, steps_planned=cfg["steps"], device=device, threads=threads,
                   on_error=on_error, extra_fields=SUMMARY_FIELDS, reraise=is_source,
                   inputs=[p for p in (backbone_path, data_path, source_path) if p])


# rule -> the job: (spec, named inputs, params, run directory, threads); workflow/scripts/study_run.py calls it.
# The source stage has no on_error: its weights are every arm's input, so its failure raises.
RULES = {rule: lambda spec, i, p, out, threads: run_peft(spec, i["backbone"], i["data"], out, source_path=i.get("source"),
                                                         device=p["device"], threads=threads,
                                                         on_error=p.get("on_error", "raise"))
         for rule in ("peft_run", "peft_source")}
