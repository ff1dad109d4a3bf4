"""Study 3 (``peft`` config section): the PEFT grid — full / partial / linear / adapters / LoRA (incl. LoRA on
deformable attention) — on a classification task and an instance-segmentation task.

Runs:
- ``RUN_IDS["source"]`` (``peft/<task>/source``): for a segmentation task with a ``source`` dataset, the dense
  head and the backbone (from the core ``pretrain`` rule) are first trained in full on the source domain. This
  is the "pretrained detector" the paper adapts: the PEFT arms then start from a trained dense head.
- ``RUN_IDS["arm"]`` (``peft/<task>/<arm>/seed<k>``): one arm of the grid on the task's (shifted) target
  dataset. Arms expand their list-valued options (``adaptlab.peft.methods.METHODS``, one entry per method):
  ``adapter`` → ``<name>-n<N>-rf<reduction>``; ``lora`` → ``<name>-<targets>-r<r>-a<alpha>`` with
  alpha = alpha_scale · r. Arms whose LoRA targets exist only in the deformable head are skipped on
  classification tasks.

Each run writes the core summary plus ``SUMMARY_FIELDS`` and ``adapter.safetensors`` (trainable tensors only).
Tables: ``peft_results`` (mean ± std over seeds per task × arm), ``peft_pareto`` (the arms on the
metric-vs-trainable-% front), ``peft_adapter_depth`` (metric by number of chained adapters). Figure:
``peft_pareto`` (metric vs trainable %, log x, one panel per task); both in ``adaptlab.peft.tables``. The run
function is ``adaptlab.peft.run.run_peft``.
"""
from __future__ import annotations

from adaptlab.config import ConfigError, backbone_names, backbone_spec, train_config
from adaptlab.peft.claims import CLAIMS
from adaptlab.peft.head_config import check_mask_size, head_config
from adaptlab.peft.lora import LoraSpec
from adaptlab.peft.methods import arm_fits, expand_arms
from adaptlab.peft.tables import FIGURES, SUMMARY_FIELDS, TABLES

# the Study surface (adaptlab.studies.Study)
__all__ = ["SECTION", "RUN_IDS", "check", "specs", "SUMMARY_FIELDS", "RAW_TABLES", "TABLES", "FIGURES", "CLAIMS"]
SECTION = "peft"
SOURCE_ARM = "source"
RUN_IDS = {"source": "peft/{ptask}/" + SOURCE_ARM, "arm": "peft/{ptask}/{arm}/seed{seed}"}
RAW_TABLES: dict = {}
METRIC = {"classification": "acc", "segmentation": "mask_ap"}
# the paper's PEFT optimiser (AdamW, lr 1e-3, weight decay 0.05); `peft.train`, a task's and an arm's `train`
# override it (full / partial arms typically set lr 1e-4)
PEFT_TRAIN_DEFAULTS = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch_size": 32}


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
        # timm's to_2tuple would do, but importing timm here costs seconds at every parse of the workflow
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        try:
            check_mask_size(size, head_config(sec["head"]))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for name, arm in sec["arms"].items():
        if arm["method"] == "lora":
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
    return {"run_id": RUN_IDS["source"].format(ptask=task_name), "task": _task_spec(cfg, task_name),
            "dataset": task["source"], "backbone": sec["backbone"], "model": bb["model"], "head": sec["head"],
            "seed": task["source_seed"], "arm": {"name": SOURCE_ARM, "label": SOURCE_ARM, "method": "full", "train": {}},
            "train": train_config(PEFT_TRAIN_DEFAULTS, sec.get("train"), task.get("source_train"))}


def specs(cfg: dict) -> dict[str, dict]:
    """run id → the full spec of that run (what its job's params hold)."""
    if SECTION not in cfg:
        return {}
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
                if not arm_fits(arm, task["kind"]):
                    continue
                for seed in sec["seeds"]:
                    rid = RUN_IDS["arm"].format(ptask=tname, arm=arm["label"], seed=seed)
                    out[rid] = {"run_id": rid, "task": tspec, "dataset": task["dataset"], "backbone": sec["backbone"],
                                "model": bb["model"], "head": sec["head"], "seed": int(seed), "arm": arm,
                                "latency_batch": sec["latency_batch"],
                                "train": train_config(PEFT_TRAIN_DEFAULTS, sec.get("train"), task.get("train"), arm["train"])}
    return out
