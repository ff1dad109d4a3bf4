"""Study 3 (``peft`` config section): the PEFT grid — full / partial / linear / adapters / LoRA (incl. LoRA on
deformable attention) — on a classification task and an instance-segmentation task.

Runs:
- ``peft/<task>/source``: for a segmentation task with a ``source`` dataset, the dense head and the backbone
  (from the core ``pretrain`` rule) are first trained in full on the source domain. This is the "pretrained
  detector" the paper adapts: the PEFT arms then start from a trained dense head, not a random one.
- ``peft/<task>/<arm>/seed<k>``: one arm of the grid on the task's (shifted) target dataset. Arms expand
  their list-valued options: ``adapter`` → ``<name>-n<N>-rf<reduction>``; ``lora`` → ``<name>-<targets>-r<r>-a<alpha>``
  with alpha = alpha_scale · r. Arms whose LoRA targets exist only in the deformable head are skipped on
  classification tasks.

Each run writes the core summary plus ``SUMMARY_FIELDS`` and ``adapter.safetensors`` (trainable tensors only).
Tables: ``peft_results`` (mean ± std over seeds per task × arm), ``peft_pareto`` (the arms on the
metric-vs-trainable-% front), ``peft_adapter_depth`` (metric by number of chained adapters). Figure:
``peft_pareto`` (metric vs trainable %, log x, one panel per task).
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pyarrow as pa

from adaptlab import records
from adaptlab.config import ConfigError, backbone_names, backbone_spec, config_hash, train_config

# torch, timm and peft are imported inside the run functions: the Snakefile imports this module to expand the
# grid, and every (cluster) job re-parses the workflow, so the import has to stay light

SECTION = "peft"
SOURCE_ARM = "source"
METRIC = {"classification": "acc", "segmentation": "mask_ap"}
# the paper's PEFT optimiser (AdamW, lr 1e-3, weight decay 0.05); `peft.train`, a task's and an arm's `train`
# override it (full / partial arms typically set lr 1e-4)
PEFT_TRAIN_DEFAULTS = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch_size": 32}


# ------------------------------------------------------------------------------------------------ grid


def expand_arms(name: str, arm: dict) -> list[dict]:
    """One dict per grid point of an arm: method options fixed, with a unique path-safe label."""
    method = arm["method"]
    base = {"name": name, "method": method, "train": arm.get("train") or {}}
    if method in ("full", "linear"):
        return [{**base, "label": name}]
    if method == "partial":
        return [{**base, "label": name, "last_blocks": arm["last_blocks"]}]
    if method == "adapter":
        return [{**base, "label": f"{name}-n{n}-rf{red}", "n_adapters": n, "reduction": red, "init": arm["init"]}
                for n, red in itertools.product(arm["n_adapters"], arm["reduction"])]
    if method == "lora":
        out = []
        for targets, r, scale in itertools.product(arm["targets"], arm["rank"], arm["alpha_scale"]):
            alpha = float(scale * r)
            out.append({**base, "label": f"{name}-{targets}-r{r}-a{alpha:g}", "targets": targets, "rank": r,
                        "alpha": alpha, "dropout": arm["dropout"]})
        return out
    raise ConfigError(f"peft.arms.{name}.method: unknown {method!r}")


def _arm_fits(arm: dict, kind: str) -> bool:
    from adaptlab.peft.lora import DEFORMABLE_TARGETS

    if arm["method"] == "lora" and kind == "classification":
        return not any(t in DEFORMABLE_TARGETS for t in arm["targets"].split("+"))
    return True


def check(cfg: dict) -> None:
    sec = cfg[SECTION]
    if sec["backbone"] not in backbone_names(cfg):
        raise ConfigError(f"peft.backbone: unknown backbone {sec['backbone']!r} (declared: {backbone_names(cfg)})")
    for name, task in sec["tasks"].items():
        if task["kind"] == "classification":
            if task["dataset"] not in cfg["datasets"]:
                raise ConfigError(f"peft.tasks.{name}.dataset: unknown dataset {task['dataset']!r} "
                                  f"(declared in datasets: {sorted(cfg['datasets'])})")
        else:
            for key in ("dataset", "source"):
                if task.get(key) is not None and task[key] not in sec["seg_datasets"]:
                    raise ConfigError(f"peft.tasks.{name}.{key}: unknown segmentation dataset {task[key]!r} "
                                      f"(declared in peft.seg_datasets: {sorted(sec['seg_datasets'])})")
        for i, arm in enumerate(task.get("arms") or []):
            if arm not in sec["arms"]:
                raise ConfigError(f"peft.tasks.{name}.arms[{i}]: unknown arm {arm!r} (declared: {sorted(sec['arms'])})")
    img_size = backbone_spec(cfg, sec["backbone"])["model"].get("img_size")
    if img_size and any(t["kind"] == "segmentation" for t in sec["tasks"].values()):
        from timm.layers import to_2tuple

        from adaptlab.peft.segmentation import check_mask_size, head_config

        try:
            check_mask_size(tuple(to_2tuple(img_size)), head_config(sec["head"]))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for name, arm in sec["arms"].items():
        if arm["method"] == "lora":
            from adaptlab.peft.lora import LoraSpec

            for t in arm["targets"]:
                try:
                    LoraSpec(targets=t).target_modules
                except ValueError as err:
                    raise ConfigError(f"peft.arms.{name}.targets: {err}") from None


def _task_spec(cfg: dict, name: str) -> dict:
    sec = cfg[SECTION]
    task = sec["tasks"][name]
    return {"name": name, "kind": task["kind"], "dataset": task["dataset"], "source": task.get("source"),
            "train_dense_head": task["train_dense_head"] or (task["kind"] == "segmentation" and not task.get("source"))}


def source_spec(cfg: dict, task_name: str) -> dict:
    """Everything the source pretraining of a segmentation task uses (its Snakemake params)."""
    sec = cfg[SECTION]
    task = sec["tasks"][task_name]
    bb = backbone_spec(cfg, sec["backbone"])
    return {"run_id": f"{SECTION}/{task_name}/{SOURCE_ARM}", "task": _task_spec(cfg, task_name),
            "dataset": task["source"], "backbone": sec["backbone"], "model": bb["model"], "head": sec["head"],
            "seed": task["source_seed"], "arm": {"name": SOURCE_ARM, "label": SOURCE_ARM, "method": "full", "train": {}},
            "train": train_config(PEFT_TRAIN_DEFAULTS, sec.get("train"), task.get("source_train"))}


def runs(cfg: dict) -> dict[str, dict]:
    """run id → the full spec of that run (what its job's params hold)."""
    if SECTION not in cfg:
        return {}
    check(cfg)
    sec = cfg[SECTION]
    bb = backbone_spec(cfg, sec["backbone"])
    out = {}
    for tname, task in sec["tasks"].items():
        tspec = _task_spec(cfg, tname)
        if task["kind"] == "segmentation" and task.get("source"):
            s = source_spec(cfg, tname)
            out[s["run_id"]] = s
        for aname in task.get("arms") or list(sec["arms"]):
            for arm in expand_arms(aname, sec["arms"][aname]):
                if not _arm_fits(arm, task["kind"]):
                    continue
                for seed in sec["seeds"]:
                    rid = f"{SECTION}/{tname}/{arm['label']}/seed{seed}"
                    out[rid] = {"run_id": rid, "task": tspec, "dataset": task["dataset"], "backbone": sec["backbone"],
                                "model": bb["model"], "head": sec["head"], "seed": int(seed), "arm": arm,
                                "latency_batch": sec["latency_batch"],
                                "train": train_config(PEFT_TRAIN_DEFAULTS, sec.get("train"), task.get("train"), arm["train"])}
    return out


def run_ids(cfg: dict) -> list[str]:
    return list(runs(cfg))


# ------------------------------------------------------------------------------------------------ records

SUMMARY_FIELDS = [
    pa.field("task", pa.string()),
    pa.field("task_kind", pa.string()),
    pa.field("arm", pa.string()),
    pa.field("method", pa.string()),
    pa.field("n_adapters", pa.int64()),
    pa.field("reduction", pa.int64()),
    pa.field("adapter_init", pa.string()),
    pa.field("lora_rank", pa.int64()),
    pa.field("lora_alpha", pa.float64()),
    pa.field("lora_targets", pa.string()),
    pa.field("added_params", pa.int64()),
    pa.field("added_params_formula", pa.int64()),
    pa.field("trainable_pct", pa.float64()),
    pa.field("metric_name", pa.string()),
    pa.field("val_metric", pa.float64()),
    pa.field("test_metric", pa.float64()),
    pa.field("test_mask_ap", pa.float64()),
    pa.field("test_mask_ap50", pa.float64()),
    pa.field("test_miou", pa.float64()),
    pa.field("train_seconds", pa.float64()),
    pa.field("latency_ms", pa.float64()),
    pa.field("latency_merged_ms", pa.float64()),
    pa.field("merge_max_abs_diff", pa.float64()),
]

_ARM_COLS = "task, arm"
TABLES = {
    "peft_results": """
        SELECT task, arm, any_value(task_kind) AS task_kind, any_value(method) AS method,
               any_value(n_adapters) AS n_adapters, any_value(reduction) AS reduction,
               any_value(lora_rank) AS lora_rank, any_value(lora_alpha) AS lora_alpha,
               any_value(lora_targets) AS lora_targets,
               count(*) AS n_runs, count(*) FILTER (WHERE status = 'ok') AS n_ok,
               any_value(trainable_params) AS trainable_params, any_value(added_params) AS added_params,
               avg(trainable_pct) AS trainable_pct, any_value(metric_name) AS metric,
               avg(test_metric) FILTER (WHERE status = 'ok') AS metric_mean,
               stddev_samp(test_metric) FILTER (WHERE status = 'ok') AS metric_std,
               avg(test_mask_ap50) FILTER (WHERE status = 'ok') AS ap50_mean,
               avg(test_miou) FILTER (WHERE status = 'ok') AS miou_mean,
               stddev_samp(test_miou) FILTER (WHERE status = 'ok') AS miou_std,
               avg(train_seconds) AS train_seconds, avg(peak_rss_mb) AS peak_rss_mb,
               avg(latency_ms) AS latency_ms, avg(latency_merged_ms) AS latency_merged_ms
        FROM runs WHERE kind = 'peft'
        GROUP BY task, arm ORDER BY task, trainable_pct, arm""",
    # an arm is on the front when no other arm of its task has at most its trainable % and at least its metric
    # (one of the two strictly)
    "peft_pareto": """
        SELECT a.task, a.arm, a.method, a.trainable_pct, a.metric, a.metric_mean, a.metric_std, a.miou_mean
        FROM peft_results a
        WHERE a.n_ok > 0 AND NOT EXISTS (
            SELECT 1 FROM peft_results b
            WHERE b.task = a.task AND b.n_ok > 0 AND b.trainable_pct <= a.trainable_pct
              AND b.metric_mean >= a.metric_mean
              AND (b.trainable_pct < a.trainable_pct OR b.metric_mean > a.metric_mean))
        ORDER BY a.task, a.trainable_pct""",
    "peft_adapter_depth": """
        SELECT task, n_adapters, count(*) FILTER (WHERE status = 'ok') AS n_ok,
               avg(test_metric) FILTER (WHERE status = 'ok') AS metric_mean,
               stddev_samp(test_metric) FILTER (WHERE status = 'ok') AS metric_std,
               avg(test_miou) FILTER (WHERE status = 'ok') AS miou_mean,
               avg(trainable_pct) AS trainable_pct
        FROM runs WHERE kind = 'peft' AND method = 'adapter'
        GROUP BY task, n_adapters ORDER BY task, n_adapters""",
}


def plot_pareto(con, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = con.execute("SELECT task, arm, method, trainable_pct, metric, metric_mean, coalesce(metric_std, 0) "
                       "FROM peft_results WHERE n_ok > 0 ORDER BY task, trainable_pct").fetchall()
    front = {(r[0], r[1]) for r in con.execute("SELECT task, arm FROM peft_pareto").fetchall()}
    tasks = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4), squeeze=False)
    colours = {"full": "k", "partial": "tab:grey", "linear": "tab:brown", "adapter": "tab:blue", "lora": "tab:orange"}
    for ax, task in zip(axes.flat, tasks):
        pts = [r for r in rows if r[0] == task]
        for method in colours:
            sel = [r for r in pts if r[2] == method and r[3] > 0]
            if sel:
                deform = [r for r in sel if method == "lora" and any(t in r[1] for t in ("sampling_offsets", "value_proj",
                                                                                          "attention_weights", "output_proj"))]
                plain = [r for r in sel if r not in deform]
                for group, marker, label in ((plain, "o", method), (deform, "^", "lora (deformable)")):
                    if group:
                        ax.errorbar([r[3] for r in group], [r[5] for r in group], yerr=[r[6] for r in group],
                                    fmt=marker, color=colours[method], ms=5, capsize=2, label=label, alpha=0.8)
        fr = sorted((r[3], r[5]) for r in pts if (r[0], r[1]) in front and r[3] > 0)
        if fr:
            ax.plot([p[0] for p in fr], [p[1] for p in fr], "r--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (%)")
        ax.set_ylabel(f"test {pts[0][4]}" if pts else "metric")
        ax.set_title(task)
        ax.legend(fontsize=7)
    if not tasks:
        axes.flat[0].text(0.5, 0.5, "no finished peft runs", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = {"peft_pareto": plot_pareto}


# ------------------------------------------------------------------------------------------------ one run


def build_task_model(spec: dict, data, backbone_path, source_path, device):
    """(model, task) of a run: the backbone from ``backbone_path``; a segmentation model's dense head from the
    source run's weights when given."""
    import torch

    from adaptlab.models.vit import create_vit, load_model_weights
    from adaptlab.peft.segmentation import InstanceSegmentation, InstanceSegmenter, head_config
    from adaptlab.train.tasks import ImageClassification

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
    import torch

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


def added_params_formula(base, arm: dict) -> int:
    """What adapters / LoRA add by the analytic formulas, counted on the un-adapted model."""
    from adaptlab.peft.adapters import adapter_params, attention_modules
    from adaptlab.peft.lora import lora_params
    from adaptlab.peft.methods import adapter_config, lora_spec

    if arm["method"] == "adapter":
        return sum(adapter_params(dim, adapter_config(arm)) for _, _, dim in attention_modules(base))
    if arm["method"] == "lora":
        return lora_params(base, lora_spec(arm))
    return 0


def run_peft(spec: dict, backbone_path, data_path, out_dir, *, source_path=None, device: str = "auto",
             threads: int = 1, on_error: str = "record") -> dict:
    """One run of the grid (or, with arm ``source``, the full source pretraining of a segmentation task)."""
    import torch

    from adaptlab.data.store import load_dataset
    from adaptlab.models.vit import count_parameters, save_model_weights
    from adaptlab.peft.lora import merged_copy
    from adaptlab.peft.methods import TASK_PARTS, apply_method, save_trainable
    from adaptlab.peft.segmentation import load_seg_dataset
    from adaptlab.runner import error_text, start_run, summary_row
    from adaptlab.train.loop import BEST_NAME, CKPT_NAME, fit

    out_dir, dev, t0 = start_run(out_dir, threads, device)
    cfg, arm, kind = spec["train"], spec["arm"], spec["task"]["kind"]
    is_source = arm["label"] == SOURCE_ARM
    identity = {"run_id": spec["run_id"], "kind": "peft_source" if is_source else "peft", "study": SECTION,
                "grid": spec["task"]["name"], "backbone": spec["backbone"], "dataset": spec["dataset"],
                "seed": spec["seed"], "lr": cfg["lr"], "optimizer": cfg["optimizer"], "trainable": arm["label"]}
    extra = {f.name: None for f in SUMMARY_FIELDS}
    extra.update(task=spec["task"]["name"], task_kind=kind, arm=arm["label"], method=arm["method"],
                 n_adapters=arm.get("n_adapters"), reduction=arm.get("reduction"), adapter_init=arm.get("init"),
                 lora_rank=arm.get("rank"), lora_alpha=arm.get("alpha"), lora_targets=arm.get("targets"),
                 metric_name=METRIC[kind])
    train_model, result = None, None
    try:
        data = load_dataset(data_path) if kind == "classification" else load_seg_dataset(data_path)
        model, task = build_task_model(spec, data, backbone_path, None if is_source else source_path, dev)
        base_total = sum(p.numel() for p in model.parameters())
        formula = added_params_formula(model, arm)
        dense = TASK_PARTS[kind]["dense"] if spec["task"]["train_dense_head"] else []
        train_model = apply_method(model, arm, kind, extra_trainable=dense)
        trainable, total = count_parameters(train_model)
        extra.update(added_params=total - base_total, added_params_formula=formula,
                     trainable_pct=100.0 * trainable / total)
        result = fit(train_model, task, cfg, out_dir, device=dev, config_id=config_hash(spec))
        metric = METRIC[kind]
        extra.update(val_metric=result.best_val.get(metric), train_seconds=result.elapsed_seconds)
        if result.test:
            extra.update(test_metric=result.test.get(metric), test_mask_ap=result.test.get("mask_ap"),
                         test_mask_ap50=result.test.get("mask_ap50"), test_miou=result.test.get("miou"))
        if is_source:
            save_model_weights(model, out_dir / "model.safetensors")
        else:
            save_trainable(train_model, out_dir / "adapter.safetensors", arm)
            xb = task._prepare(torch.from_numpy(data.split("val")[0][:spec["latency_batch"]].copy()).to(dev))
            extra["latency_ms"] = latency_ms(train_model, xb)
            if arm["method"] == "lora":
                merged = merged_copy(train_model)
                extra["latency_merged_ms"] = latency_ms(merged, xb)
                with torch.no_grad():
                    train_model.eval(), merged.eval()
                    extra["merge_max_abs_diff"] = (_first(merged(xb)) - _first(train_model(xb))).abs().max().item()
    except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
        if on_error == "raise":
            raise
        row = summary_row(identity, cfg, train_model, None, dev, spec, time.perf_counter() - t0, status="failed",
                          error=error_text(err))
        row = records.write_run(out_dir, {**row, **extra}, extra_fields=SUMMARY_FIELDS)
        if is_source:  # downstream arms need the file; they fail with this run's error recorded here
            raise
        return row
    row = summary_row(identity, cfg, train_model, result, dev, spec, time.perf_counter() - t0)
    row = records.write_run(out_dir, {**row, **extra}, result.log, extra_fields=SUMMARY_FIELDS)
    (out_dir / CKPT_NAME).unlink(missing_ok=True)
    (out_dir / BEST_NAME).unlink(missing_ok=True)
    return row


def spec_json(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), default=float)
