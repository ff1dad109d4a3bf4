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

RESULTS = "results"

# Defaults of the shared training loop; finetune.defaults, then a grid's `train`, override them.
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
    "warmup_steps": 0.1,
    "min_lr_factor": 0.0,
    "clip_grad": 1.0,
    "eval_every": 50,
    "ckpt_every": 100,
    "hflip": False,
    "keep_weights": False,
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key (and file when known)."""


def schema() -> dict:
    text = resources.files("adaptlab").joinpath("config.schema.yaml").read_text()
    return yaml.safe_load(text)


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
    _check_references(cfg, source)
    return cfg


def _check_references(cfg: dict, source: str) -> None:
    datasets = cfg["datasets"]
    pre = cfg["pretrain"]
    if pre["init"] == "scratch" and pre["dataset"] not in datasets:
        raise ConfigError(f"{source}: pretrain.dataset: unknown dataset {pre['dataset']!r} (declared: {sorted(datasets)})")
    if pre["init"] == "file" and not pre.get("weights"):
        raise ConfigError(f"{source}: pretrain.weights: required when pretrain.init is 'file'")
    if pre["init"] == "file" and not cfg["model"].get("timm_name"):
        raise ConfigError(f"{source}: model.timm_name: required when pretrain.init is 'file' (the architecture of the weights)")
    sets = cfg["trainable_sets"]
    for name, grid in cfg["finetune"]["grids"].items():
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
# Grid expansion


def format_lr(lr: float) -> str:
    return format(float(lr), "g")


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

    @property
    def run_id(self) -> str:
        return f"{self.grid}/{self.dataset}/{self.trainable}/{self.optimizer}/lr{format_lr(self.lr)}/seed{self.seed}"

    @property
    def run_dir(self) -> str:
        return f"{RESULTS}/runs/{self.run_id}"

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "study": self.study,
            "grid": self.grid,
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
                            train = train_config(ft.get("defaults"), grid.get("train"),
                                                 {"lr": float(lr), "optimizer": opt})
                            runs.append(RunSpec(
                                grid=name, study=grid["study"], dataset=ds, trainable=trainable, optimizer=opt,
                                lr=float(lr), seed=int(seed), train=train,
                                trainable_patterns=tuple(cfg["trainable_sets"][trainable]),
                            ))
    return runs


def pretrain_spec(cfg: dict) -> dict:
    """Everything the pretraining job uses (its Snakemake params)."""
    pre = cfg["pretrain"]
    return {
        "dataset": pre["dataset"],
        "init": pre["init"],
        "weights": pre.get("weights"),
        "seed": pre["seed"],
        "model": cfg["model"],
        "train": train_config(pre.get("train")),
    }


def stable_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=float)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(stable_json(obj).encode()).hexdigest()[:16]
