"""Records, SQL tables and the Pareto figure of the PEFT study (its ``Study`` surface re-exports them)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from adaptlab.peft.methods import METHODS

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
    from adaptlab.aggregate import panel_axes, save_panels
    from adaptlab.peft.lora import DEFORMABLE_TARGETS

    rows = con.execute("SELECT task, arm, method, trainable_pct, metric, metric_mean, coalesce(metric_std, 0) "
                       "FROM peft_results WHERE n_ok > 0 ORDER BY task, trainable_pct").fetchall()
    front = {(r[0], r[1]) for r in con.execute("SELECT task, arm FROM peft_pareto").fetchall()}
    tasks = sorted({r[0] for r in rows})
    fig, axes = panel_axes(len(tasks), width=5.5, height=4)
    colours = {name: m.colour for name, m in METHODS.items()}
    for ax, task in zip(axes.flat, tasks):
        pts = [r for r in rows if r[0] == task]
        for method in colours:
            sel = [r for r in pts if r[2] == method and r[3] > 0]
            if sel:
                deform = [r for r in sel if method == "lora" and any(t in r[1] for t in DEFORMABLE_TARGETS)]
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
    save_panels(fig, axes, len(tasks), path, "no finished peft runs")


FIGURES = {"peft_pareto": plot_pareto}
