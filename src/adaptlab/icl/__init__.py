"""Study 4 (section ``icl``): the in-context-learning testbed, RoPE vs absolute positions, multimodal asymmetry.

Runs:
* ``RUN_IDS["uni"]``, ``icl/uni/<scheme>/K<K>/seed<s>``: a decoder trained on the unimodal generator with K classes; it keeps its
  best-IC weights in ``model.safetensors`` (a stage-1 checkpoint for the multimodal runs);
* ``RUN_IDS["mm"]``, ``icl/mm/<arm>/K<K2>/seed<s>``: the secondary modality with K2 classes on top of the stage-1 run
  ``icl/uni/<stage1.scheme>/K<stage1.K>/seed<s>`` (arm ``pretrained``) or a random decoder (``scratch``).

Each run evaluates at step 0 and every ``eval_every`` steps; every metric is kept in the raw table
``icl_eval`` (run_id, step, layer, metric, value; layer 0 = model-level metrics) and in steps.parquet as
``val_*`` columns. Tables: ``icl_training`` (per run × eval step × layer), ``icl_threshold`` (final metrics per
scheme × K with the threshold K*), ``icl_multimodal`` (per arm × K2); in ``adaptlab.icl.tables``. The run
function is ``adaptlab.icl.run.run_icl``.
"""
from __future__ import annotations

from adaptlab.config import ConfigError, train_config
from adaptlab.icl.claims import CLAIMS
from adaptlab.icl.data import check_params
from adaptlab.icl.tables import FIGURES, RAW_TABLES, SUMMARY_FIELDS, TABLES

# the Study surface (adaptlab.studies.Study)
__all__ = ["SECTION", "RUN_IDS", "check", "specs", "SUMMARY_FIELDS", "RAW_TABLES", "TABLES", "FIGURES", "CLAIMS"]
SECTION = "icl"
RUN_IDS = {"uni": "icl/uni/{scheme}/K{K}/seed{seed}", "mm": "icl/mm/{arm}/K{K2}/seed{seed}"}
MODEL_NAME = "model.safetensors"

# The paper's Adam recipe on the shared loop: constant lr, no weight decay, no clipping, no warmup.
ICL_TRAIN_DEFAULTS = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "min_lr_factor": 1.0,
                      "clip_grad": None, "batch_size": 128, "steps": 2000, "eval_every": 250, "ckpt_every": 500,
                      "eval_batch_size": 1000}


def check(cfg: dict) -> None:
    """Cross-checks the schema cannot express: every K a multiple of L, B divides N, sequences fit n_max."""
    sec = cfg[SECTION]
    d = sec["data"]
    for i, K in enumerate(sec["unimodal"]["Ks"]):
        try:
            check_params(K, d["L"], d["N"], d["B"])
        except ValueError as err:
            raise ConfigError(f"icl.unimodal.Ks[{i}]: {err}") from None
    try:
        check_params(d["L"], d["L"], d["N"], d["B"])
    except ValueError as err:
        raise ConfigError(f"icl.data.B: {err}") from None
    if d["N"] > d["n_max"]:
        raise ConfigError(f"icl.data.n_max: {d['n_max']} is smaller than N={d['N']}")
    mm = sec.get("multimodal")
    if mm:
        try:
            check_params(mm["stage1"]["K"], d["L"], d["N"], d["B"], where="icl.multimodal.stage1.K")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if 3 * d["N"] + 2 > 2 * d["n_max"] + 1:
            raise ConfigError(f"icl.data.n_max: {d['n_max']} too small for multimodal sequences of {3 * d['N'] + 2} tokens")
        if mm["L2"] > d["L"]:
            raise ConfigError(f"icl.multimodal.L2: {mm['L2']} exceeds icl.data.L={d['L']}")
        for i, K2 in enumerate(mm["Ks"]):
            if K2 < mm["L2"] or K2 % mm["L2"]:
                raise ConfigError(f"icl.multimodal.Ks[{i}]: K2={K2} must be a positive multiple of L2={mm['L2']}")


def _uni_specs(cfg: dict) -> list[dict]:
    sec = cfg[SECTION]
    combos = [(s, K, seed) for s in sec["unimodal"]["schemes"] for K in sec["unimodal"]["Ks"]
              for seed in sec["unimodal"]["seeds"]]
    mm = sec.get("multimodal")
    if mm and "pretrained" in mm["arms"]:
        combos += [(mm["stage1"]["scheme"], mm["stage1"]["K"], seed) for seed in mm["seeds"]]
    seen, out = set(), []
    for scheme, K, seed in combos:
        if (scheme, K, seed) not in seen:
            seen.add((scheme, K, seed))
            out.append({"run_id": RUN_IDS["uni"].format(scheme=scheme, K=K, seed=seed), "kind": "icl_uni", "scheme": scheme, "K": K,
                        "seed": seed, "data": sec["data"], "model": sec["model"],
                        "train": train_config(ICL_TRAIN_DEFAULTS, sec["train"])})
    return out


def _mm_specs(cfg: dict) -> list[dict]:
    sec = cfg[SECTION]
    mm = sec.get("multimodal")
    if not mm:
        return []
    st1 = mm["stage1"]
    return [{"run_id": RUN_IDS["mm"].format(arm=arm, K2=K2, seed=seed), "kind": "icl_mm", "arm": arm, "scheme": st1["scheme"],
             "K": st1["K"], "K2": K2, "seed": seed, "data": sec["data"], "model": sec["model"],
             "secondary": {k: mm[k] for k in ("D2", "L2", "eps2", "alpha2")},
             "stage1": RUN_IDS["uni"].format(scheme=st1["scheme"], K=st1["K"], seed=seed) if arm == "pretrained" else None,
             "train": train_config(ICL_TRAIN_DEFAULTS, sec["train"], mm["train"])}
            for arm in mm["arms"] for K2 in mm["Ks"] for seed in mm["seeds"]]


def specs(cfg: dict) -> dict[str, dict]:
    """run_id → everything the run uses (its Snakemake params)."""
    if SECTION not in cfg:
        return {}
    return {s["run_id"]: s for s in _uni_specs(cfg) + _mm_specs(cfg)}
