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

from adaptlab.config import ConfigError, backbone_spec, run_model_config
from adaptlab.packs import LAYOUT_KEYS  # how runs are laid out in jobs, not what a run is
from adaptlab.plasticity.claims import CLAIMS
from adaptlab.plasticity.tables import FIGURES, RAW_TABLES, SUMMARY_FIELDS, TABLES

# the Study surface (adaptlab.studies.Study)

__all__ = ["SECTION", "RUN_IDS", "check", "specs", "SUMMARY_FIELDS", "RAW_TABLES", "TABLES", "FIGURES", "CLAIMS"]
SECTION = "plasticity"
RUN_IDS = {"analysis": "plasticity/analysis/{backbone}/{dataset}",
           "linear_probe": "plasticity/linear_probe/{backbone}/{dataset}"}


def study_pairs(cfg: dict) -> list[tuple[str, str]]:
    """(backbone, dataset) of every finetuning grid of the study, in config order, without repeats."""
    pairs = []
    for grid in cfg["finetune"]["grids"].values():
        if grid["study"] == SECTION:
            pairs += [(grid["backbone"], ds) for ds in grid["datasets"] if (grid["backbone"], ds) not in pairs]
    return pairs


def source_dataset(cfg: dict, backbone: str) -> str:
    """The pretraining-distribution side of the pairs: ``plasticity.source`` or the backbone's pretrain dataset."""
    return cfg[SECTION].get("source") or backbone_spec(cfg, backbone)["pretrain"]["dataset"]


def check(cfg: dict) -> None:
    for backbone, _ in study_pairs(cfg):
        src = source_dataset(cfg, backbone)
        if src not in cfg["datasets"]:
            raise ConfigError(f"plasticity.source: unknown dataset {src!r} (declared: {sorted(cfg['datasets'])})")


def specs(cfg: dict) -> dict[str, dict]:
    """The analysis and the linear probe of every (backbone, dataset) pair; both use the same spec."""
    if SECTION not in cfg:
        return {}
    out = {}
    for kind in RUN_IDS:
        for backbone, dataset in study_pairs(cfg):
            out[RUN_IDS[kind].format(backbone=backbone, dataset=dataset)] = {
                **{k: v for k, v in cfg[SECTION].items() if k not in LAYOUT_KEYS}, "backbone": backbone, "dataset": dataset, "source": source_dataset(cfg, backbone),
                "model": run_model_config(backbone_spec(cfg, backbone)["model"])}
    return out
