"""The AdamO paper's claims (Rosseau et al., ICML 2026; notes: shared/papers/adamo.md) as data, checked by the
pipeline into ``paper_claims`` (``adaptlab.claims``).

Neither the paper's benchmarks nor any of its numbers are readable; every claim is checked by direction.
Choices that are ours, not the paper's:
- Plasticity is the final train accuracy on each task (random-label tasks: pure memorisation); "losing plasticity"
  means the mean over the last K tasks (``acc_last``) is below the mean over the first K (``acc_first``).
- Methods are classed from each run's method config (``runs.config_json``): ``adamo`` (optimizer adamo with an
  isometry lambda > 0), ``isometry`` (the coupled variant, also the paper's), ``adam`` (plain Adam: no weight
  decay, L2-init, reset or penalty) and ``other`` (every other existing approach: AdamW, L2, L2-init,
  Shrink & Perturb, ReDo, ...). The existing approaches are ``adam`` and ``other``.
- "Matches or outperforms" means AdamO's best lambda is at most 2 accuracy points below the best existing approach
  on last-K-task accuracy, per (grid, benchmark, model); the mean over those cells is checked.
- eNTK conditioning "governs" plasticity: log10 kappa(eNTK) measured after a task correlates negatively with the
  accuracy reached on the next task (Pearson r over runs × tasks where kappa was measured).
"""
from __future__ import annotations

from adaptlab.claims import Claim


def _num(key: str) -> str:
    return f"coalesce(TRY_CAST(config_json->>'$.method.{key}' AS DOUBLE), 0)"


# ok continual runs with their method family; per (grid, benchmark, model, method) cell: means over seeds
_RUNS = f"""
    WITH m AS (
        SELECT grid, dataset AS benchmark, backbone AS model, method, acc_first, acc_last, dead_frac_end,
               config_json->>'$.method.optimizer' AS opt, {_num('isometry_lambda')} AS iso,
               {_num('coupled_lambda')} AS coupled, {_num('l2_init')} AS l2_init, {_num('weight_decay')} AS wd,
               config_json->>'$.method.shrink' IS NULL AND config_json->>'$.method.redo_tau' IS NULL AS no_reset
        FROM runs WHERE kind = 'continual' AND status = 'ok'),
    c AS (
        SELECT *, CASE WHEN opt = 'adamo' AND iso > 0 THEN 'adamo'
                       WHEN coupled > 0 THEN 'isometry'
                       WHEN opt = 'adam' AND iso = 0 AND l2_init = 0 AND wd = 0 AND no_reset THEN 'adam'
                       ELSE 'other' END AS family
        FROM m),
    cell AS (
        SELECT grid, benchmark, model, method, any_value(family) AS family, avg(acc_last) AS acc_last,
               avg(dead_frac_end) AS dead_end
        FROM c GROUP BY grid, benchmark, model, method)"""

CLAIMS: list[Claim] = [
    Claim(
        id="adam_loses_plasticity",
        claim="On continual-learning benchmarks designed to induce plasticity loss, Adam loses plasticity: later "
              "tasks are learned less well than the first ones.",
        # acc_last - acc_first of plain-Adam runs, mean over runs
        sql=f"""{_RUNS}
            SELECT avg(acc_last - acc_first), count(acc_last - acc_first) FROM c WHERE family = 'adam'""",
        direction="<", threshold=0.0),
    Claim(
        id="adamo_matches_or_beats_baselines",
        claim="AdamO matches or outperforms existing approaches to plasticity loss.",
        # per (grid, benchmark, model): best AdamO last-K-task accuracy - best existing approach's; mean over cells;
        # > -0.02 = at most 2 points below (ours)
        sql=f"""{_RUNS},
            t AS (SELECT grid, benchmark, model, max(acc_last) FILTER (WHERE family = 'adamo') AS adamo,
                         max(acc_last) FILTER (WHERE family IN ('adam', 'other')) AS existing
                  FROM cell GROUP BY grid, benchmark, model)
            SELECT avg(adamo - existing), count(adamo - existing) FROM t""",
        direction=">", threshold=-0.02),
    Claim(
        id="adamo_fewer_dead_units",
        claim="AdamO's isometry step keeps ReLU units alive: it ends a task sequence with fewer dead units than Adam.",
        # per (grid, benchmark, model): plain Adam's dead fraction at the end - AdamO's (mean over lambdas)
        sql=f"""{_RUNS},
            t AS (SELECT grid, benchmark, model, avg(dead_end) FILTER (WHERE family = 'adam') AS adam,
                         avg(dead_end) FILTER (WHERE family = 'adamo') AS adamo
                  FROM cell GROUP BY grid, benchmark, model)
            SELECT avg(adam - adamo), count(adam - adamo) FROM t""",
        direction=">", threshold=0.0),
    Claim(
        id="ntk_condition_governs_plasticity",
        claim="Plasticity is governed by the condition number of the empirical NTK: the worse conditioned it is, the "
              "less well the next task is learned.",
        # Pearson r(log10 eNTK kappa after task t, accuracy on task t + 1) over runs × measured tasks
        sql="""
            WITH k AS (SELECT run_id, task, value AS ntk FROM continual_task_metrics
                       WHERE layer = 'all' AND metric = 'ntk_cond' AND value > 0),
            a AS (SELECT run_id, task, value AS acc FROM continual_task_metrics WHERE layer = 'all' AND metric = 'acc')
            SELECT corr(log10(k.ntk), a.acc), count(*) FROM k JOIN a ON a.run_id = k.run_id AND a.task = k.task + 1""",
        direction="<", threshold=0.0, min_n=5),
]
