"""Study 1 — ViT component plasticity (Odonnat et al., arXiv 2602.06883) and the component-wise finetuning grid.

Runs of the study:
- ``plasticity/analysis/<backbone>/<dataset>``: per-layer plasticity and bounds of every component (raw table
  ``plasticity_probe``), for every (backbone, dataset) finetuned by a grid with ``study: plasticity``;
- ``plasticity/linear_probe/<backbone>/<dataset>``: the linear-probing baseline of the same pairs;
- the finetuning runs themselves are ordinary ``finetune.grids`` (``study: plasticity``), one trainable set per
  component configuration, run by the core finetune rule and the shared training loop.
Settings live in the config section ``plasticity`` (schema: ``schemas/plasticity.schema.yaml``).
"""
from __future__ import annotations

from adaptlab.plasticity.tables import FIGURES, RAW_TABLES, SUMMARY_FIELDS, TABLES

__all__ = ["FIGURES", "RAW_TABLES", "SUMMARY_FIELDS", "TABLES", "run_ids", "study_pairs", "source_dataset", "check"]

STUDY = "plasticity"


def study_pairs(cfg: dict) -> list[tuple[str, str]]:
    """(backbone, dataset) of every finetuning grid of the study, in config order, without repeats."""
    pairs = []
    for grid in cfg["finetune"]["grids"].values():
        if grid["study"] == STUDY:
            pairs += [(grid["backbone"], ds) for ds in grid["datasets"] if (grid["backbone"], ds) not in pairs]
    return pairs


def source_dataset(cfg: dict, backbone: str) -> str:
    """The pretraining-distribution side of the pairs: ``plasticity.source`` or the backbone's pretrain dataset."""
    from adaptlab.config import backbone_spec

    return cfg[STUDY].get("source") or backbone_spec(cfg, backbone)["pretrain"]["dataset"]


def check(cfg: dict, source: str = "config") -> None:
    from adaptlab.config import ConfigError

    if STUDY not in cfg:
        return
    for backbone, _ in study_pairs(cfg):
        src = source_dataset(cfg, backbone)
        if src not in cfg["datasets"]:
            raise ConfigError(f"{source}: plasticity.source: unknown dataset {src!r} (declared: {sorted(cfg['datasets'])})")


def analysis_run_id(backbone: str, dataset: str) -> str:
    return f"{STUDY}/analysis/{backbone}/{dataset}"


def linear_probe_run_id(backbone: str, dataset: str) -> str:
    return f"{STUDY}/linear_probe/{backbone}/{dataset}"


def run_ids(cfg: dict) -> list[str]:
    if STUDY not in cfg:
        return []
    check(cfg)
    pairs = study_pairs(cfg)
    return [analysis_run_id(*p) for p in pairs] + [linear_probe_run_id(*p) for p in pairs]
