"""Study 5: AdamO and the continual-learning plasticity benchmark (config section ``continual``).

Each grid runs benchmarks × models × methods × seeds; run ids are ``RUN_IDS["run"]``. A run
(``adaptlab.continual.run``) trains one model through the task sequence with the shared loop and writes,
besides ``summary.parquet``, the raw table ``continual_task_metrics`` (run × task × layer × metric, long
format). SQL tables:

- ``continual_tasks``: per grid/benchmark/model/method/task, mean and std over seeds of the final train
  accuracy, online accuracy, dead and 0.1-dormant fractions, mean cond / effective rank / Gram deviation of
  the regularised matrices, weight norm, feature rank and eNTK κ (null on tasks where it was not measured);
- ``continual_summary``: per method, accuracy over the first vs the last K tasks and the dead fraction at the
  end, mean ± std over seeds.

Figures: ``continual_accuracy`` and ``continual_dead`` (per task, one curve per method).
"""
from __future__ import annotations

import re

from adaptlab.config import ConfigError
from adaptlab.continual.claims import CLAIMS
from adaptlab.continual.schema import RAW_SCHEMA, SUMMARY_FIELDS
from adaptlab.packs import LAYOUT_KEYS

# the Study surface (adaptlab.studies.Study)
__all__ = ["SECTION", "RUN_IDS", "check", "specs", "SUMMARY_FIELDS", "RAW_TABLES", "TABLES", "FIGURES", "CLAIMS"]
SECTION = "continual"
RUN_IDS = {"run": "continual/{cgrid}/{cbench}/{cmodel}/{cmethod}/seed{seed}"}
RAW_TABLES = {"continual_task_metrics": RAW_SCHEMA}


def check(cfg: dict) -> None:
    sec = cfg[SECTION]
    for name, method in sec["methods"].items():
        if re.fullmatch(r"lr[0-9.eE+-]+", name):
            raise ConfigError(f"continual.methods.{name}: a method name may not look like a finetune lr directory")
        if method["isometry_lambda"] and method["optimizer"] != "adamo":
            raise ConfigError(f"continual.methods.{name}.isometry_lambda: only used by optimizer adamo "
                              f"(use coupled_lambda for the coupled variant)")
    for gname, grid in sec["grids"].items():
        for key in ("benchmarks", "models", "methods"):
            for i, name in enumerate(grid[key]):
                if name not in sec[key]:
                    raise ConfigError(f"continual.grids.{gname}.{key}[{i}]: unknown {key[:-1]} {name!r} "
                                      f"(declared: {sorted(sec[key])})")
            if len(set(grid[key])) != len(grid[key]):
                raise ConfigError(f"continual.grids.{gname}.{key}: duplicate values {grid[key]}")
        for b in grid["benchmarks"]:
            bench = sec["benchmarks"][b]
            if bench["labels"] == "permuted" and bench["inputs"] == "gaussian":
                raise ConfigError(f"continual.benchmarks.{b}.labels: permuted tasks need image inputs (true labels)")
            if bench["labels"] == "pairs" and bench["inputs"] != "dataset":
                raise ConfigError(f"continual.benchmarks.{b}.labels: pairs tasks need inputs: dataset")
            if bench["inputs"] == "dataset" and bench.get("dataset") not in cfg["datasets"]:
                raise ConfigError(f"continual.benchmarks.{b}.dataset: {bench.get('dataset')!r} is not a dataset of "
                                  f"`datasets` (declared: {sorted(cfg['datasets'])})")
            if bench["inputs"] == "digits" and bench["n"] > 1797:
                raise ConfigError(f"continual.benchmarks.{b}.n: digits has 1797 images, got {bench['n']}")
            for m in grid["models"]:
                model = sec["models"][m]
                if model["kind"] == "vit" and bench["inputs"] == "gaussian":
                    raise ConfigError(f"continual.grids.{gname}: model {m!r} (vit) needs image inputs, "
                                      f"benchmark {b!r} is {bench['inputs']}")
                if model["kind"] == "vit" and bench["inputs"] == "digits" and 8 % model["patch_size"]:
                    raise ConfigError(f"continual.models.{m}.patch_size: must divide the 8×8 digits")


def specs(cfg: dict) -> dict[str, dict]:
    """run id → every value the run uses (its Snakemake params)."""
    if SECTION not in cfg:
        return {}
    sec, out = cfg[SECTION], {}
    for gname, grid in sec["grids"].items():
        # a grid's pack and fuse say how its runs are laid out in jobs, not what a run is
        grid_cfg = {k: v for k, v in grid.items() if k not in ("benchmarks", "models", "methods", "seeds", *LAYOUT_KEYS)}
        for b in grid["benchmarks"]:
            for m in grid["models"]:
                for meth in grid["methods"]:
                    for seed in grid["seeds"]:
                        rid = RUN_IDS["run"].format(cgrid=gname, cbench=b, cmodel=m, cmethod=meth, seed=seed)
                        out[rid] = {"run_id": rid, "grid": gname, "seed": int(seed), "grid_cfg": grid_cfg,
                                    "benchmark_name": b, "benchmark": sec["benchmarks"][b],
                                    "model_name": m, "model": sec["models"][m],
                                    "method_name": meth, "method": sec["methods"][meth]}
    return out


def layout(cfg: dict, grid: str, key: str):
    """A grid's ``pack`` or ``fuse``: its own when set, else the section's (rules/continual.smk)."""
    own = cfg[SECTION]["grids"][grid].get(key)
    return cfg[SECTION][key] if own is None else own


def imports_timm(rule: str, spec: dict) -> bool:
    """A run's job needs timm only for a ViT (``adaptlab.jobstart``): an MLP sequence's job skips its import."""
    return spec["model"]["kind"] != "mlp"


KEYS = "grid, benchmark, model, method"
# (column, metric, layer) of continual_tasks
TASK_METRICS = [("acc", "acc"), ("online_acc", "online_acc"), ("dead_frac", "dead"), ("dormant_frac", "dormant_0.1"),
                ("cond", "cond"), ("eff_rank", "eff_rank"), ("gram_dev", "gram_dev"), ("weight_norm", "weight_norm"),
                ("feature_rank", "feature_eff_rank"), ("ntk_cond", "ntk_cond")]
_cols = ",\n".join(f"avg(value) FILTER (WHERE metric = '{m}') AS {c}_mean, "
                   f"stddev_samp(value) FILTER (WHERE metric = '{m}') AS {c}_std" for c, m in TASK_METRICS)

TABLES = {
    "continual_tasks": f"""
        SELECT {KEYS}, task, count(DISTINCT seed) AS n_seeds,
        {_cols}
        FROM continual_task_metrics WHERE layer = 'all'
        GROUP BY ALL ORDER BY {KEYS}, task""",
    "continual_summary": """
        SELECT grid, dataset AS benchmark, backbone AS model, method, any_value(optimizer) AS optimizer,
               any_value(lr) AS lr, count(*) AS n_runs, count(*) FILTER (WHERE status = 'ok') AS n_ok,
               any_value(summary_tasks) AS k_tasks,
               avg(acc_first) AS acc_first_mean, stddev_samp(acc_first) AS acc_first_std,
               avg(acc_last) AS acc_last_mean, stddev_samp(acc_last) AS acc_last_std,
               avg(acc_last - acc_first) AS acc_change_mean,
               avg(dead_frac_end) AS dead_end_mean, stddev_samp(dead_frac_end) AS dead_end_std,
               avg(wall_seconds) AS wall_s_mean
        FROM runs WHERE kind = 'continual'
        GROUP BY grid, dataset, backbone, method ORDER BY grid, benchmark, model, method""",
}


def _plot_per_task(con, path, column: str, ylabel: str) -> None:
    from matplotlib import colormaps

    from adaptlab.aggregate import panel_axes, save_panels

    rows = con.execute(f"SELECT grid, benchmark, model, method, task, {column}_mean FROM continual_tasks "
                       f"ORDER BY ALL").fetchall()
    panels = sorted({r[:3] for r in rows})
    methods = sorted({r[3] for r in rows})
    # one colour per method across panels: matplotlib's default cycle has 10 colours, the cpu preset 11 methods
    colours = {m: f"C{i}" if len(methods) <= 10 else colormaps["tab20"](i % 20) for i, m in enumerate(methods)}
    fig, axes = panel_axes(len(panels), width=5, height=3.6)
    for ax, panel in zip(axes.flat, panels):
        for method in sorted({r[3] for r in rows if r[:3] == panel}):
            pts = [(r[4], r[5]) for r in rows if r[:3] == panel and r[3] == method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2, label=method, color=colours[method])
        ax.set_title("/".join(panel), fontsize=9)
        ax.set_xlabel("task")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)
    save_panels(fig, axes, len(panels), path, "no continual runs")


FIGURES = {
    "continual_accuracy": lambda con, path: _plot_per_task(con, path, "acc", "final train accuracy (mean over seeds)"),
    "continual_dead": lambda con, path: _plot_per_task(con, path, "dead_frac", "dead-unit fraction"),
}
