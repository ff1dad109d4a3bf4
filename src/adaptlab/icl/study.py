"""Study 4 (section ``icl``): the in-context-learning testbed, RoPE vs absolute positions, multimodal asymmetry.

Runs:
* ``icl/uni/<scheme>/K<K>/seed<s>``: a decoder trained on the unimodal generator with K classes; it keeps its
  best-IC weights in ``model.safetensors`` (a stage-1 checkpoint for the multimodal runs);
* ``icl/mm/<arm>/K<K2>/seed<s>``: the secondary modality with K2 classes on top of the stage-1 run
  ``icl/uni/<stage1.scheme>/K<stage1.K>/seed<s>`` (arm ``pretrained``) or a random decoder (``scratch``).

Each run evaluates at step 0 and every ``eval_every`` steps; every metric is kept in the raw table
``icl_eval`` (run_id, step, layer, metric, value; layer 0 = model-level metrics) and in steps.parquet as
``val_*`` columns. Tables: ``icl_training`` (per run × eval step × layer), ``icl_threshold`` (final metrics per
scheme × K with the threshold K*), ``icl_multimodal`` (per arm × K2).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from adaptlab import records
from adaptlab.config import ConfigError, config_hash, train_config
from adaptlab.icl.data import ICLWorld, MultimodalWorld, check_params

# torch, the model and the loop are imported inside the run functions: the Snakefile imports this module to
# expand run ids, and every (cluster) job re-parses the Snakefile, so a torch import here slows each job.

SECTION = "icl"
MODEL_NAME = "model.safetensors"

# The paper's Adam recipe on the shared loop: constant lr, no weight decay, no clipping, no warmup.
ICL_TRAIN_DEFAULTS = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "min_lr_factor": 1.0,
                      "clip_grad": None, "batch_size": 128, "steps": 2000, "eval_every": 250, "ckpt_every": 500,
                      "eval_batch_size": 1000}


def uni_run_id(scheme: str, K: int, seed: int) -> str:
    return f"icl/uni/{scheme}/K{K}/seed{seed}"


def mm_run_id(arm: str, K2: int, seed: int) -> str:
    return f"icl/mm/{arm}/K{K2}/seed{seed}"


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
        check_params(mm["stage1"]["K"], d["L"], d["N"], d["B"], where="icl.multimodal.stage1.K")
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
            out.append({"run_id": uni_run_id(scheme, K, seed), "kind": "icl_uni", "scheme": scheme, "K": K,
                        "seed": seed, "data": sec["data"], "model": sec["model"],
                        "train": train_config(ICL_TRAIN_DEFAULTS, sec["train"])})
    return out


def _mm_specs(cfg: dict) -> list[dict]:
    sec = cfg[SECTION]
    mm = sec.get("multimodal")
    if not mm:
        return []
    st1 = mm["stage1"]
    return [{"run_id": mm_run_id(arm, K2, seed), "kind": "icl_mm", "arm": arm, "scheme": st1["scheme"],
             "K": st1["K"], "K2": K2, "seed": seed, "data": sec["data"], "model": sec["model"],
             "secondary": {k: mm[k] for k in ("D2", "L2", "eps2", "alpha2")},
             "stage1": uni_run_id(st1["scheme"], st1["K"], seed) if arm == "pretrained" else None,
             "train": train_config(ICL_TRAIN_DEFAULTS, sec["train"], mm["train"])}
            for arm in mm["arms"] for K2 in mm["Ks"] for seed in mm["seeds"]]


def specs(cfg: dict) -> dict[str, dict]:
    """run_id → everything the run uses (its Snakemake params)."""
    if SECTION not in cfg:
        return {}
    check(cfg)
    return {s["run_id"]: s for s in _uni_specs(cfg) + _mm_specs(cfg)}


def run_ids(cfg: dict) -> list[str]:
    return list(specs(cfg))


# ----------------------------------------------------------------------------------------------------------
# One run

def build_world(spec: dict):
    d = spec["data"]
    world = ICLWorld(spec["K"], D=d["D"], L=d["L"], N=d["N"], B=d["B"], p_bursty=d["p_bursty"], p_novel=d["p_novel"],
                     eps=d["eps"], alpha=d["alpha"], novel_classes=d["novel_classes"], n_max=d["n_max"],
                     no_repeats=d["no_repeats"], seed=spec["seed"])
    if spec["kind"] == "icl_mm":
        s = spec["secondary"]
        world = MultimodalWorld(world, spec["K2"], D2=s["D2"], L2=s["L2"], eps2=s["eps2"], alpha2=s["alpha2"],
                                seed=spec["seed"])
    return world


def build_model(spec: dict):
    from adaptlab.icl.model import ICLTransformer

    d, m = spec["data"], spec["model"]
    m2 = spec["secondary"]["D2"] if spec["kind"] == "icl_mm" else None
    return ICLTransformer(d["D"], d["L"], pos=spec["scheme"], n_layers=m["n_layers"], n_heads=m["n_heads"],
                          n_max=d["n_max"], mlp=m["mlp"], rope_base=m["rope_base"], m2_dim=m2)


def _eval_rows(run_id: str, step: int, metrics: dict) -> list[dict]:
    rows = []
    for key, val in metrics.items():
        if key in ("acc",):
            continue
        name, layer = key, 0
        if "_l" in key and key.rsplit("_l", 1)[1].isdigit():
            name, layer = key.rsplit("_l", 1)[0], int(key.rsplit("_l", 1)[1])
        rows.append({"run_id": run_id, "step": int(step), "layer": layer, "metric": name,
                     "value": None if val is None or not math.isfinite(val) else float(val)})
    return rows


def run_icl(spec: dict, out_dir: str | Path, *, init_weights: str | Path | None = None, device: str = "auto",
            threads: int = 1, on_error: str = "record") -> dict:
    """Train one ICL run with the shared loop and write summary, steps, the ``icl_eval`` raw table and weights."""
    import torch
    from safetensors.torch import load_file

    from adaptlab.icl.task import ICLTask
    from adaptlab.runner import error_text, start_run, summary_row
    from adaptlab.train.loop import fit

    out_dir, dev, t0 = start_run(out_dir, threads, device)
    cfg = spec["train"]
    identity = {"run_id": spec["run_id"], "kind": spec["kind"], "study": SECTION,
                "grid": "unimodal" if spec["kind"] == "icl_uni" else "multimodal", "backbone": "icl_decoder",
                "dataset": f"icl_K{spec['K']}" + (f"_K2_{spec['K2']}" if spec["kind"] == "icl_mm" else ""),
                "seed": spec["seed"], "lr": cfg["lr"], "optimizer": cfg["optimizer"],
                "trainable": "full"}
    extra = {"icl_scheme": spec["scheme"], "icl_K": spec["K"], "icl_K2": spec.get("K2"), "icl_arm": spec.get("arm")}
    model, result, evals = None, None, []
    try:
        world = build_world(spec)
        torch.manual_seed(spec["seed"])
        model = build_model(spec)
        if init_weights:
            state = load_file(str(init_weights))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("projector.") for k in missing):
                raise ValueError(f"stage-1 weights do not fit: missing {missing}, unexpected {unexpected}")
        task = ICLTask(world, dev, spec["seed"], eval_size=spec["data"]["eval_size"],
                       eval_batch_size=cfg["eval_batch_size"])
        evals += _eval_rows(spec["run_id"], 0, task.evaluate(model.to(dev), "val"))
        result = fit(model, task, cfg, out_dir, device=dev, config_id=config_hash(spec))
    except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
        if on_error == "raise":
            raise
        row = summary_row(identity, cfg, model, None, dev, spec, time.perf_counter() - t0, status="failed",
                          error=error_text(err))
        row.update(extra)
        _write(out_dir, spec, row, {}, evals, None)
        return row
    log = result.log
    for i, step in enumerate(log["step"]):
        if not math.isnan(log.get("val_acc", [math.nan] * len(log["step"]))[i]):
            evals += _eval_rows(spec["run_id"], step, {k[4:]: log[k][i] for k in log if k.startswith("val_")})
    final = {r["metric"] + (f"_l{r['layer']}" if r["layer"] else ""): r["value"] for r in evals
             if r["step"] == max(e["step"] for e in evals)}
    last = spec["model"]["n_layers"]
    test = result.test or {}
    row = summary_row(identity, cfg, model, result, dev, spec, time.perf_counter() - t0)
    row.update(extra, icl_final_step=max(e["step"] for e in evals), icl_ic_acc=final.get("ic_acc"),
               icl_ic2_acc=final.get("ic2_acc"), icl_iw_acc=final.get("iw_acc"), icl_cla=final.get("ic_cla"),
               icl_m2only_acc=final.get("m2only_acc"), icl_ih_last=final.get(f"ih_l{last}"),
               icl_ph_first=final.get("ph_l1"), icl_test_ic_acc=test.get("ic_acc"),
               icl_test_ic2_acc=test.get("ic2_acc"), icl_test_iw_acc=test.get("iw_acc"),
               icl_test_m2only_acc=test.get("m2only_acc"))
    # model.safetensors: the best-IC weights fit restored (the stage-1 checkpoint of the multimodal runs)
    _write(out_dir, spec, row, log, evals, model)
    return row


def _write(out_dir: Path, spec: dict, row: dict, log: dict, evals: list[dict], model) -> None:
    from safetensors.torch import save_file

    from adaptlab.train.loop import BEST_NAME, CKPT_NAME

    records.write_run(out_dir, row, log, extra_fields=SUMMARY_FIELDS)
    table = pa.Table.from_pylist(evals, schema=RAW_TABLES["icl_eval"])
    import pyarrow.parquet as pq

    pq.write_table(table, out_dir / "icl_eval.parquet")
    if spec["kind"] == "icl_uni":
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()} if model is not None else {}
        save_file(state, str(out_dir / MODEL_NAME))
    (out_dir / CKPT_NAME).unlink(missing_ok=True)
    (out_dir / BEST_NAME).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Records, tables and figures (the registry in adaptlab.studies reads these)

SUMMARY_FIELDS = [
    pa.field("icl_scheme", pa.string()), pa.field("icl_K", pa.int64()), pa.field("icl_K2", pa.int64()),
    pa.field("icl_arm", pa.string()), pa.field("icl_final_step", pa.int64()),
    pa.field("icl_ic_acc", pa.float64()), pa.field("icl_ic2_acc", pa.float64()), pa.field("icl_iw_acc", pa.float64()),
    pa.field("icl_cla", pa.float64()), pa.field("icl_m2only_acc", pa.float64()), pa.field("icl_ih_last", pa.float64()),
    pa.field("icl_ph_first", pa.float64()), pa.field("icl_test_ic_acc", pa.float64()),
    pa.field("icl_test_ic2_acc", pa.float64()), pa.field("icl_test_iw_acc", pa.float64()),
    pa.field("icl_test_m2only_acc", pa.float64()),
]

RAW_TABLES = {"icl_eval": pa.schema([
    pa.field("run_id", pa.string()), pa.field("step", pa.int64()), pa.field("layer", pa.int64()),
    pa.field("metric", pa.string()), pa.field("value", pa.float64())])}


def _pivot(metrics: list[str]) -> str:
    return ", ".join(f"max(value) FILTER (WHERE metric = '{m}') AS {m}" for m in metrics)


TABLES = {
    # one row per run × eval step × layer: accuracies (model-level) next to that layer's attention measures
    "icl_training": f"""
        WITH m AS (SELECT run_id, step, {_pivot(['ic_acc', 'ic2_acc', 'iw_acc', 'train_acc', 'm2only_acc',
                                                 'ic_cla', 'iw_cla', 'loss'])}
                   FROM icl_eval WHERE layer = 0 GROUP BY run_id, step),
             a AS (SELECT run_id, step, layer, {_pivot(['ph', 'ph2', 'ih', 'tila', 'tla', 'tiia', 'tiia_m1', 'tiia_m2'])}
                   FROM icl_eval WHERE layer > 0 GROUP BY run_id, step, layer)
        SELECT r.kind, r.icl_scheme AS scheme, r.icl_K AS K, r.icl_K2 AS K2, r.icl_arm AS arm, r.seed, run_id, step,
               layer, m.ic_acc, m.ic2_acc, m.iw_acc, m.train_acc, m.m2only_acc, m.ic_cla, m.iw_cla, m.loss AS ic_loss,
               a.ph, a.ph2, a.ih, a.tila, a.tla, a.tiia, a.tiia_m1, a.tiia_m2
        FROM a JOIN m USING (run_id, step) JOIN runs r USING (run_id)
        ORDER BY kind, scheme, K, K2, arm, seed, step, layer""",
    # final (last eval step) metrics per scheme × K; K* = smallest K whose mean IC accuracy reaches 0.5
    "icl_threshold": """
        WITH g AS (
            SELECT icl_scheme AS scheme, icl_K AS K, count(*) AS n_seeds,
                   avg(icl_ic_acc) AS ic_acc, stddev_samp(icl_ic_acc) AS ic_acc_std, avg(icl_ic2_acc) AS ic2_acc,
                   avg(icl_iw_acc) AS iw_acc, avg(icl_cla) AS cla, avg(icl_ih_last) AS ih_last,
                   avg(icl_ph_first) AS ph_first, any_value(icl_final_step) AS steps
            FROM runs WHERE kind = 'icl_uni' AND status = 'ok' GROUP BY ALL)
        SELECT g.*, ic_acc >= 0.5 AS is_icl,
               min(K) FILTER (WHERE ic_acc >= 0.5) OVER (PARTITION BY scheme) AS k_star
        FROM g ORDER BY scheme, K""",
    # multimodal: final metrics per arm × K2, and the pretrained arm before any stage-2 step (step 0)
    "icl_multimodal": """
        SELECT icl_arm AS arm, icl_scheme AS scheme, icl_K2 AS K2, count(*) AS n_seeds,
               avg(icl_ic_acc) AS ic_acc, avg(icl_ic2_acc) AS ic2_acc, avg(icl_iw_acc) AS iw_acc,
               avg(icl_m2only_acc) AS m2only_acc, avg(icl_cla) AS cla, avg(icl_ih_last) AS ih_last,
               avg(e.value) AS ic_acc_step0, any_value(icl_final_step) AS steps
        FROM runs LEFT JOIN icl_eval e ON e.run_id = runs.run_id AND e.step = 0 AND e.layer = 0 AND e.metric = 'ic_acc'
        WHERE kind = 'icl_mm' AND status = 'ok' GROUP BY ALL ORDER BY arm, K2""",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy_vs_k(path: Path, rows: list[tuple], series: tuple[str, ...], xlabel: str, empty: str) -> None:
    """Rows (group, K, acc_1, …): one colour per group, one line style per accuracy named in ``series``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, grp in enumerate(sorted({r[0] for r in rows})):
        pts = [r for r in rows if r[0] == grp]
        for j, (style, name) in enumerate(zip(("-o", ":^", "--s"), series)):
            ax.plot([p[1] for p in pts], [p[2 + j] for p in pts], style, color=f"C{i}", label=f"{grp} {name}")
    if rows:
        ax.set_xscale("log", base=2)
    else:
        ax.text(0.5, 0.5, empty, ha="center")
    ax.set_ylim(-0.02, 1.02)
    _finish(plt, fig, ax, path, xlabel, "final accuracy")


def plot_icl_vs_k(con, path: Path) -> None:
    """Final ICL (IC), swapped-label (IC2) and IWL (IW) accuracy against K, one colour per positional scheme."""
    rows = con.execute("SELECT scheme, K, ic_acc, ic2_acc, iw_acc FROM icl_threshold ORDER BY scheme, K").fetchall()
    _accuracy_vs_k(path, rows, ("ICL (IC)", "IC2 (swapped)", "IWL (IW)"), "K (training classes)", "no unimodal runs")


def plot_induction_vs_icl(con, path: Path) -> None:
    """Induction strength of the last layer against IC accuracy at every eval step of every run."""
    plt = _plt()
    rows = con.execute("""SELECT CASE WHEN kind = 'icl_mm' THEN 'mm ' || arm ELSE scheme END AS grp, ih, ic_acc
                          FROM icl_training t WHERE layer = (SELECT max(layer) FROM icl_training)
                          ORDER BY grp""").fetchall()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for grp in sorted({r[0] for r in rows}):
        pts = [r for r in rows if r[0] == grp]
        x, y = np.array([p[1] for p in pts], float), np.array([p[2] for p in pts], float)
        ok = np.isfinite(x) & np.isfinite(y)
        r = np.corrcoef(x[ok], y[ok])[0, 1] if ok.sum() > 2 and x[ok].std() > 0 and y[ok].std() > 0 else float("nan")
        ax.scatter(x, y, s=10, alpha=0.7, label=f"{grp} (Pearson r = {r:.2f})")
    if not rows:
        ax.text(0.5, 0.5, "no ICL runs", ha="center")
    _finish(plt, fig, ax, path, "induction strength IH (last layer)", "ICL accuracy (IC)")


def plot_multimodal(con, path: Path) -> None:
    """Multimodal grid: IC, IC2 and the M2-only diagnostic against K2 per arm."""
    rows = con.execute("SELECT arm, K2, ic_acc, ic2_acc, m2only_acc FROM icl_multimodal ORDER BY arm, K2").fetchall()
    _accuracy_vs_k(path, rows, ("IC", "IC2", "IC-M2only"), "K2 (secondary classes)", "no multimodal runs")


FIGURES = {"icl_vs_k": plot_icl_vs_k, "icl_induction": plot_induction_vs_icl, "icl_multimodal": plot_multimodal}
