"""Records, SQL tables and figures of the ICL study (its ``Study`` surface re-exports them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

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


def _one_panel(width: float):
    from adaptlab.aggregate import panel_axes

    fig, axes = panel_axes(1, width=width, height=3.8)
    return fig, axes, axes.flat[0]


def _finish(fig, axes, path: Path, xlabel: str, ylabel: str) -> None:
    from adaptlab.aggregate import save_panels

    ax = axes.flat[0]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    save_panels(fig, axes, 1, path, "")


def _accuracy_vs_k(path: Path, rows: list[tuple], series: tuple[str, ...], xlabel: str, empty: str) -> None:
    """Rows (group, K, acc_1, …): one colour per group, one line style per accuracy named in ``series``."""
    fig, axes, ax = _one_panel(5.5)
    for i, grp in enumerate(sorted({r[0] for r in rows})):
        pts = [r for r in rows if r[0] == grp]
        for j, (style, name) in enumerate(zip(("-o", ":^", "--s"), series)):
            ax.plot([p[1] for p in pts], [p[2 + j] for p in pts], style, color=f"C{i}", label=f"{grp} {name}")
    if rows:
        ax.set_xscale("log", base=2)
    else:
        ax.text(0.5, 0.5, empty, ha="center")
    ax.set_ylim(-0.02, 1.02)
    _finish(fig, axes, path, xlabel, "final accuracy")


def plot_icl_vs_k(con, path: Path) -> None:
    """Final ICL (IC), swapped-label (IC2) and IWL (IW) accuracy against K, one colour per positional scheme."""
    rows = con.execute("SELECT scheme, K, ic_acc, ic2_acc, iw_acc FROM icl_threshold ORDER BY scheme, K").fetchall()
    _accuracy_vs_k(path, rows, ("ICL (IC)", "IC2 (swapped)", "IWL (IW)"), "K (training classes)", "no unimodal runs")


def plot_induction_vs_icl(con, path: Path) -> None:
    """Induction strength of the last layer against IC accuracy at every eval step of every run."""
    rows = con.execute("""SELECT CASE WHEN kind = 'icl_mm' THEN 'mm ' || arm ELSE scheme END AS grp, ih, ic_acc
                          FROM icl_training t WHERE layer = (SELECT max(layer) FROM icl_training)
                          ORDER BY grp""").fetchall()
    fig, axes, ax = _one_panel(5)
    for grp in sorted({r[0] for r in rows}):
        pts = [r for r in rows if r[0] == grp]
        x, y = np.array([p[1] for p in pts], float), np.array([p[2] for p in pts], float)
        ok = np.isfinite(x) & np.isfinite(y)
        r = np.corrcoef(x[ok], y[ok])[0, 1] if ok.sum() > 2 and x[ok].std() > 0 and y[ok].std() > 0 else float("nan")
        ax.scatter(x, y, s=10, alpha=0.7, label=f"{grp} (Pearson r = {r:.2f})")
    if not rows:
        ax.text(0.5, 0.5, "no ICL runs", ha="center")
    _finish(fig, axes, path, "induction strength IH (last layer)", "ICL accuracy (IC)")


def plot_multimodal(con, path: Path) -> None:
    """Multimodal grid: IC, IC2 and the M2-only diagnostic against K2 per arm."""
    rows = con.execute("SELECT arm, K2, ic_acc, ic2_acc, m2only_acc FROM icl_multimodal ORDER BY arm, K2").fetchall()
    _accuracy_vs_k(path, rows, ("IC", "IC2", "IC-M2only"), "K2 (secondary classes)", "no multimodal runs")


FIGURES = {"icl_vs_k": plot_icl_vs_k, "icl_induction": plot_induction_vs_icl, "icl_multimodal": plot_multimodal}
