"""Study 2: preconditioned attention (adaptlab.models.precond_attention) vs timm attention.

Config section ``precond`` (schema: adaptlab/schemas/precond.schema.yaml). For every phase (``pretrain``: from
scratch on a source dataset; ``finetune``: from the study backbone's weights), arm (an attention config) and
seed there is one run ``RUN_IDS["train"]``; one more run ``RUN_IDS["timing"]`` measures the time
per step of every arm interleaved. Raw tables: ``attention_condition`` (kappa per layer, head and probe step),
``precond_loss`` (train loss and its EMA per step), ``precond_timing``. SQL tables: ``precond_runs`` (one row a
run) and ``precond_summary`` (one row per phase and arm: mean ± std over seeds). Figures: loss curves and mean
log10 kappa over training.
"""
from __future__ import annotations

from pathlib import Path

from adaptlab.config import ConfigError, _deep_merge, backbone_names, backbone_spec, pretrain_spec, train_config
from adaptlab.precond.claims import CLAIMS
from adaptlab.precond.schema import CONDITION_SCHEMA, LOSS_SCHEMA, SUMMARY_FIELDS, TIMING_SCHEMA

# the Study surface (adaptlab.studies.Study)
__all__ = ["SECTION", "RUN_IDS", "check", "specs", "SUMMARY_FIELDS", "RAW_TABLES", "TABLES", "FIGURES", "CLAIMS"]
SECTION = "precond"
RUN_IDS = {"train": "precond/{phase}/{arm}/seed{seed}", "timing": "precond/timing"}
TIMING_RUN = RUN_IDS["timing"]

RAW_TABLES = {"attention_condition": CONDITION_SCHEMA, "precond_loss": LOSS_SCHEMA, "precond_timing": TIMING_SCHEMA}


def check(cfg: dict) -> None:
    sec = cfg[SECTION]
    if sec["backbone"] not in backbone_names(cfg):
        raise ConfigError(f"precond.backbone: unknown backbone {sec['backbone']!r} (declared: {backbone_names(cfg)})")
    if sec["baseline"] not in sec["arms"]:
        raise ConfigError(f"precond.baseline: {sec['baseline']!r} is not one of precond.arms ({sorted(sec['arms'])})")
    for phase in sec["phases"]:
        ds = sec[phase]["dataset"] or (pretrain_spec(cfg, sec["backbone"])["dataset"] if phase == "pretrain" else None)
        if ds is None:
            raise ConfigError(f"precond.{phase}.dataset: required when phases include {phase!r}")
        if ds not in cfg["datasets"]:
            raise ConfigError(f"precond.{phase}.dataset: unknown dataset {ds!r} (declared: {sorted(cfg['datasets'])})")
    if len(set(sec["seeds"])) != len(sec["seeds"]):
        raise ConfigError(f"precond.seeds: duplicate values {sec['seeds']}")


def specs(cfg: dict) -> dict[str, dict]:
    """run id → every value that run uses (its Snakemake params). Empty when the section is absent."""
    if SECTION not in cfg:
        return {}
    sec = cfg[SECTION]
    bb = backbone_spec(cfg, sec["backbone"])
    scratch_model = _deep_merge(bb["model"], sec["pretrain"].get("model") or {})
    specs = {}
    for phase in sec["phases"]:
        if phase == "pretrain":
            dataset = sec["pretrain"]["dataset"] or bb["pretrain"]["dataset"]
            train = train_config(bb["pretrain"].get("train"), sec["pretrain"]["train"])
            model = scratch_model
        else:
            dataset = sec["finetune"]["dataset"]
            train = train_config(cfg["finetune"].get("defaults"), sec["finetune"]["train"])
            model = bb["model"]
        for arm, attention in sec["arms"].items():
            for seed in sec["seeds"]:
                rid = RUN_IDS["train"].format(phase=phase, arm=arm, seed=seed)
                specs[rid] = {
                    "run_id": rid, "phase": phase, "arm": arm, "baseline": sec["baseline"], "seed": int(seed),
                    "backbone": sec["backbone"], "dataset": dataset,
                    "model": {**model, "attention": {**model["attention"], **attention}},
                    "train": train, "probe": sec["probe"], "ema": sec["ema"],
                    "threshold_factor": sec["threshold_factor"], "on_error": cfg["finetune"]["on_error"],
                }
    timed = scratch_model if "pretrain" in sec["phases"] else bb["model"]
    specs[TIMING_RUN] = {"run_id": TIMING_RUN, "backbone": sec["backbone"], "model": timed,
                         "timing": sec["timing"], "baseline": sec["baseline"],
                         "arms": {a: {**timed["attention"], **att} for a, att in sec["arms"].items()}}
    return specs


_RUNS = "(SELECT * FROM runs WHERE kind = 'precond')"

TABLES = {
    "precond_runs": f"""
        WITH r AS {_RUNS},
        base AS (SELECT precond_phase, seed, precond_loss_ema_end AS base_end FROM r WHERE precond_is_baseline),
        thr AS (SELECT r.run_id, r.precond_threshold_factor * base.base_end AS threshold
                FROM r JOIN base USING (precond_phase, seed)),
        hit AS (SELECT l.run_id, min(l.step) AS steps_to_threshold FROM precond_loss l JOIN thr USING (run_id)
                WHERE l.loss_ema <= thr.threshold GROUP BY ALL),
        k AS (SELECT run_id, avg(log10(kappa_pre)) AS log10_kappa_pre, avg(log10(kappa_post)) AS log10_kappa_post
              FROM attention_condition GROUP BY ALL),
        kend AS (SELECT run_id, avg(log10(kappa_pre)) AS log10_kappa_pre_final,
                        avg(log10(kappa_post)) AS log10_kappa_post_final
                 FROM attention_condition c
                 WHERE step = (SELECT max(step) FROM attention_condition c2 WHERE c2.run_id = c.run_id) GROUP BY ALL)
        SELECT r.precond_phase AS phase, r.precond_arm AS arm, r.seed, r.run_id, r.status, r.steps_done,
               r.precond_loss_ema_q1 AS loss_ema_q1, r.precond_loss_ema_q2 AS loss_ema_q2,
               r.precond_loss_ema_end AS loss_ema_end, base.base_end AS baseline_loss_ema_end,
               thr.threshold AS loss_threshold, hit.steps_to_threshold,
               r.best_val_acc, r.test_acc, k.log10_kappa_pre, k.log10_kappa_post, kend.log10_kappa_pre_final,
               kend.log10_kappa_post_final, r.precond_sec_per_step AS sec_per_step_in_run
        FROM r LEFT JOIN base USING (precond_phase, seed) LEFT JOIN thr USING (run_id) LEFT JOIN hit USING (run_id)
             LEFT JOIN k USING (run_id) LEFT JOIN kend USING (run_id)
        ORDER BY phase, arm, seed""",
    # timing: median over the interleaved repeats of the timing run; overhead vs the baseline arm's median
    "precond_summary": """
        WITH t AS (SELECT arm, median(sec_per_step) AS sec_per_step FROM precond_timing GROUP BY ALL),
        tb AS (SELECT t.sec_per_step AS base_sec FROM t
               WHERE t.arm = (SELECT any_value(precond_arm) FROM runs WHERE kind = 'precond' AND precond_is_baseline))
        SELECT phase, arm, count(*) AS n_runs, count(*) FILTER (WHERE status = 'ok') AS n_ok,
               avg(loss_ema_q1) AS loss_q1_mean, stddev_samp(loss_ema_q1) AS loss_q1_std,
               avg(loss_ema_q2) AS loss_q2_mean, stddev_samp(loss_ema_q2) AS loss_q2_std,
               avg(loss_ema_end) AS loss_end_mean, stddev_samp(loss_ema_end) AS loss_end_std,
               count(*) FILTER (WHERE loss_ema_end < baseline_loss_ema_end) AS n_seeds_end_below_baseline,
               avg(steps_to_threshold) AS steps_to_threshold_mean,
               count(steps_to_threshold) AS n_reached_threshold,
               avg(best_val_acc) AS val_acc_mean, stddev_samp(best_val_acc) AS val_acc_std,
               avg(test_acc) AS test_acc_mean, stddev_samp(test_acc) AS test_acc_std,
               avg(log10_kappa_pre) AS log10_kappa_pre_mean, avg(log10_kappa_post) AS log10_kappa_post_mean,
               avg(log10_kappa_post_final) AS log10_kappa_post_final_mean,
               any_value(t.sec_per_step) AS sec_per_step,
               100 * (any_value(t.sec_per_step) / any_value(tb.base_sec) - 1) AS overhead_pct,
               avg(sec_per_step_in_run) AS sec_per_step_in_runs
        FROM precond_runs LEFT JOIN t USING (arm) LEFT JOIN tb ON true
        GROUP BY ALL ORDER BY phase, arm""",
}


def _plot(con, path: Path, sql: str, ylabel: str) -> None:
    """One panel per phase, one curve per arm: (phase, arm, step, value[, dashed value]) rows."""
    from adaptlab.aggregate import panel_axes, save_panels

    rows = con.execute(sql).fetchall()
    phases = sorted({r[0] for r in rows})
    fig, axes = panel_axes(len(phases), width=5, height=3.6)
    for ax, phase in zip(axes.flat, phases):
        for i, arm in enumerate(sorted({r[1] for r in rows if r[0] == phase})):
            pts = [r for r in rows if r[0] == phase and r[1] == arm]
            line, = ax.plot([p[2] for p in pts], [p[3] for p in pts], label=arm, color=f"C{i}")
            if len(pts[0]) > 4:
                ax.plot([p[2] for p in pts], [p[4] for p in pts], ls="--", color=line.get_color(), lw=1)
        ax.set_title(phase)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    save_panels(fig, axes, len(phases), path, "no finished runs")


def plot_loss_curves(con, path: Path) -> None:
    """EMA train loss over steps per phase, one curve per arm (mean over seeds)."""
    _plot(con, path, """
        SELECT r.precond_phase, r.precond_arm, l.step, avg(l.loss_ema)
        FROM precond_loss l JOIN runs r USING (run_id) WHERE r.status = 'ok' GROUP BY ALL ORDER BY ALL""",
          "train loss (EMA), mean over seeds")


def plot_kappa(con, path: Path) -> None:
    """Mean log10 kappa over layers, heads and seeds per probe step: after C solid, before C dashed."""
    _plot(con, path, """
        SELECT r.precond_phase, r.precond_arm, c.step, avg(log10(c.kappa_post)), avg(log10(c.kappa_pre))
        FROM attention_condition c JOIN runs r USING (run_id) WHERE r.status = 'ok' GROUP BY ALL ORDER BY ALL""",
          "mean log10 kappa (solid: after C, dashed: before)")


FIGURES = {"precond_loss_curves": plot_loss_curves, "precond_kappa": plot_kappa}
