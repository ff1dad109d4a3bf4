"""Load, validate and expand the pipeline configuration.

The JSON schema (``config.schema.yaml``, shipped in this package) is the single source of truth for keys,
types, ranges and defaults; jsonschema checks it. What a schema cannot express (a grid naming a dataset
that is not declared, a pretrained-weights init without a file) is checked here. Every error names the key.

Grid expansion lives here too, so the Snakefile, the aggregation and the tests agree on what the runs are.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from adaptlab.studies import STUDIES, studies

RESULTS = "results"

# Defaults of the shared training loop; finetune.defaults, then a grid's `train`, override them.
# `compile` (torch.compile) and `fused_adam` (see config.schema.yaml) are train keys too but have no entry here:
# the loop and the optimizers read cfg.get(...), so runs that leave them out keep exactly the params (rerun
# trigger) they had.
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 200,
    "batch_size": 64,
    "eval_batch_size": 256,
    "lr": 0.01,
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    # AdamO (adaptlab.train.adamo): decoupled isometry step on the matrices selected by name
    "isometry_lambda": 0.01,
    "isometry_scale": 1.0,
    "isometry_lr_scale": 1.0,
    "isometry_patterns": ["*"],
    "isometry_exclude": ["head*", "*embed*", "*norm*", "*cls_token*", "*pos_embed*", "*reg_token*"],
    "warmup_steps": 0.1,
    "min_lr_factor": 0.0,
    "clip_grad": 1.0,
    "eval_every": 50,
    "ckpt_every": 100,
    "hflip": False,
    "keep_weights": False,
}


# Defaults of the default backbone. They live here, not in the schema, because `backbones.<name>` reuse the
# same schema as overrides, where a filled-in default would silently replace the base value.
# `model.attention`: the attention layer of the backbone (adaptlab.models.vit.attention_layer).
ATTENTION_DEFAULTS: dict[str, Any] = {"kind": "timm", "form": "col", "eps": 1e-6, "detach": False}
MODEL_DEFAULTS: dict[str, Any] = {
    "timm_name": None, "img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4,
    "mlp_ratio": 4.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "attention": ATTENTION_DEFAULTS,
}
PRETRAIN_DEFAULTS: dict[str, Any] = {"init": "scratch", "weights": None, "seed": 0}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key (and file when known)."""


def schema() -> dict:
    """The main schema plus one top-level section per study fragment in ``adaptlab/schemas/<section>.schema.yaml``.

    A study owns its section's schema file, so studies never edit each other's keys.
    """
    root = resources.files("adaptlab")
    out = yaml.safe_load(root.joinpath("config.schema.yaml").read_text())
    for section in STUDIES:  # the registered studies (adaptlab.studies)
        frag = root.joinpath("schemas", f"{section}.schema.yaml")
        out["properties"][section] = yaml.safe_load(frag.read_text())
    return out


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _with_defaults(validator_cls):
    """A validator that fills `default:` values into the instance (the recipe from the jsonschema FAQ)."""
    validate_properties = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema_)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate ``config`` against the schema and the cross-references; return a copy with defaults filled."""
    cfg = copy.deepcopy(config)
    Validator = _with_defaults(jsonschema.Draft202012Validator)
    errors = sorted(Validator(schema()).iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        lines = []
        for err in errors[:10]:
            # For if/then branches jsonschema reports the innermost failure; best_match gives the clearest.
            err = jsonschema.exceptions.best_match([err]) or err
            lines.append(f"  {_key_path(err.absolute_path)}: {err.message}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines))
    cfg["model"] = {**copy.deepcopy(MODEL_DEFAULTS), **cfg["model"]}
    cfg["model"]["attention"] = {**ATTENTION_DEFAULTS, **cfg["model"]["attention"]}
    cfg["pretrain"] = {**PRETRAIN_DEFAULTS, **cfg["pretrain"]}
    _check_references(cfg, source)
    _check_studies(cfg, source)
    return cfg


def _check_studies(cfg: dict, source: str) -> None:
    """Every present study section's own cross-checks (``Study.check``), reported like a schema error."""
    for study in studies():
        if study.SECTION in cfg:
            try:
                study.check(cfg)
            except ConfigError as err:
                raise ConfigError(f"{source}: invalid configuration\n  {err}") from None


def _check_references(cfg: dict, source: str) -> None:
    datasets = cfg["datasets"]
    pre = cfg["pretrain"]
    if pre["init"] == "scratch" and pre["dataset"] not in datasets:
        raise ConfigError(f"{source}: pretrain.dataset: unknown dataset {pre['dataset']!r} (declared: {sorted(datasets)})")
    if pre["init"] == "file" and not pre.get("weights"):
        raise ConfigError(f"{source}: pretrain.weights: required when pretrain.init is 'file'")
    if pre["init"] == "file" and not cfg["model"].get("timm_name"):
        raise ConfigError(f"{source}: model.timm_name: required when pretrain.init is 'file' (the architecture of the weights)")
    for name, bb in cfg["backbones"].items():
        if name == DEFAULT_BACKBONE:
            raise ConfigError(f"{source}: backbones.{name}: the name {name!r} is the backbone of `model`/`pretrain`")
        merged = backbone_spec(cfg, name)
        if merged["pretrain"]["init"] == "scratch" and merged["pretrain"]["dataset"] not in datasets:
            raise ConfigError(f"{source}: backbones.{name}.pretrain.dataset: unknown dataset "
                              f"{merged['pretrain']['dataset']!r} (declared: {sorted(datasets)})")
        if merged["pretrain"]["init"] == "file" and not merged["pretrain"].get("weights"):
            raise ConfigError(f"{source}: backbones.{name}.pretrain.weights: required when pretrain.init is 'file'")
    backbones = backbone_names(cfg)
    sets = cfg["trainable_sets"]
    for name, grid in cfg["finetune"]["grids"].items():
        if grid["backbone"] not in backbones:
            raise ConfigError(f"{source}: finetune.grids.{name}.backbone: unknown backbone {grid['backbone']!r} "
                              f"(declared: {backbones})")
        for i, ds in enumerate(grid["datasets"]):
            if ds not in datasets:
                raise ConfigError(f"{source}: finetune.grids.{name}.datasets[{i}]: unknown dataset {ds!r} (declared: {sorted(datasets)})")
        for i, t in enumerate(grid["trainable"]):
            if t not in sets:
                raise ConfigError(f"{source}: finetune.grids.{name}.trainable[{i}]: unknown trainable set {t!r} (declared in trainable_sets: {sorted(sets)})")
        for key in ("seeds", "lrs", "datasets", "optimizers", "trainable"):
            if len(set(grid[key])) != len(grid[key]):
                raise ConfigError(f"{source}: finetune.grids.{name}.{key}: duplicate values {grid[key]}")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_config(raw, source=str(path))


# ----------------------------------------------------------------------------------------------------------
# Backbones: `model` + `pretrain` are the default backbone; `backbones.<name>` override them for more.

DEFAULT_BACKBONE = "base"


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in (over or {}).items():
        out[key] = _deep_merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else copy.deepcopy(val)
    return out


def backbone_names(cfg: dict) -> list[str]:
    return [DEFAULT_BACKBONE] + sorted(cfg.get("backbones", {}))


def backbone_spec(cfg: dict, name: str = DEFAULT_BACKBONE) -> dict:
    """{"model": ..., "pretrain": ...} of a backbone: the defaults, deep-merged with ``backbones.<name>``."""
    base = {"model": cfg["model"], "pretrain": cfg["pretrain"]}
    if name == DEFAULT_BACKBONE:
        return copy.deepcopy(base)
    if name not in cfg.get("backbones", {}):
        raise ConfigError(f"backbone: unknown {name!r} (declared: {backbone_names(cfg)})")
    over = cfg["backbones"][name]
    return _deep_merge(base, {"model": over.get("model", {}), "pretrain": over.get("pretrain", {})})


def pretrain_run_id(backbone: str) -> str:
    return f"pretrain/{backbone}"


# ----------------------------------------------------------------------------------------------------------
# Grid expansion


def format_lr(lr: float) -> str:
    return format(float(lr), "g")


# The one owner of a finetuning run's id; rules/finetune.smk uses the same pattern as its wildcard path.
FINETUNE_RUN_ID = "{grid}/{dataset}/{trainable}/{optimizer}/lr{lr}/seed{seed}"


@dataclass(frozen=True)
class RunSpec:
    """One finetuning run: every value it uses, so its identity and its rerun trigger are the same thing."""

    grid: str
    study: str
    dataset: str
    trainable: str
    optimizer: str
    lr: float
    seed: int
    train: dict = field(hash=False, compare=False)
    trainable_patterns: tuple = ()
    backbone: str = DEFAULT_BACKBONE
    model: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def run_id(self) -> str:
        return FINETUNE_RUN_ID.format(grid=self.grid, dataset=self.dataset, trainable=self.trainable,
                                      optimizer=self.optimizer, lr=format_lr(self.lr), seed=self.seed)

    @property
    def run_dir(self) -> str:
        return f"{RESULTS}/runs/{self.run_id}"

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "study": self.study,
            "grid": self.grid,
            "backbone": self.backbone,
            "model": self.model,
            "dataset": self.dataset,
            "trainable": self.trainable,
            "trainable_patterns": list(self.trainable_patterns),
            "optimizer": self.optimizer,
            "lr": float(self.lr),
            "seed": int(self.seed),
            "train": self.train,
        }


def train_config(*layers: dict | None) -> dict:
    out = dict(TRAIN_DEFAULTS)
    for layer in layers:
        out.update(layer or {})
    return out


def run_model_config(model: dict) -> dict:
    """A backbone's model config as a run's params hold it: the default (timm) attention is left out, so adding
    attention options never changes (and reruns) the runs that do not use them."""
    if model.get("attention", {}).get("kind", "timm") == "timm":
        return {k: v for k, v in model.items() if k != "attention"}
    return model


def run_train_config(*layers: dict | None) -> dict:
    """``train_config`` without AdamO's keys unless the optimizer is adamo: a run's params (its rerun trigger) hold
    only what it uses, so adding an optimizer's defaults never reruns the other runs."""
    out = train_config(*layers)
    if out["optimizer"] != "adamo":
        out = {k: v for k, v in out.items() if not k.startswith("isometry_")}
    return out


def expand_runs(cfg: dict) -> list[RunSpec]:
    """Expand every grid in ``finetune.grids`` into its runs (datasets × trainable × optimizer × lr × seed)."""
    runs: list[RunSpec] = []
    ft = cfg["finetune"]
    for name, grid in ft["grids"].items():
        for ds in grid["datasets"]:
            for trainable in grid["trainable"]:
                for opt in grid["optimizers"]:
                    for lr in grid["lrs"]:
                        for seed in grid["seeds"]:
                            train = run_train_config(ft.get("defaults"), grid.get("train"),
                                                 {"lr": float(lr), "optimizer": opt})
                            runs.append(RunSpec(
                                grid=name, study=grid["study"], dataset=ds, trainable=trainable, optimizer=opt,
                                lr=float(lr), seed=int(seed), train=train,
                                trainable_patterns=tuple(cfg["trainable_sets"][trainable]),
                                backbone=grid["backbone"], model=run_model_config(backbone_spec(cfg, grid["backbone"])["model"]),
                            ))
    return runs


def pretrain_spec(cfg: dict, backbone: str = DEFAULT_BACKBONE) -> dict:
    """Everything the pretraining job of one backbone uses (its Snakemake params)."""
    spec = backbone_spec(cfg, backbone)
    pre = spec["pretrain"]
    return {
        "backbone": backbone,
        "dataset": pre["dataset"],
        "init": pre["init"],
        "weights": pre.get("weights"),
        "seed": pre["seed"],
        "model": run_model_config(spec["model"]),
        "train": run_train_config(pre.get("train")),
    }


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=float)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(stable_json(obj).encode()).hexdigest()[:16]
