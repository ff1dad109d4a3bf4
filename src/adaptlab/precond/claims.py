"""The preconditioned-attention paper's claims (Saratchandran, arXiv 2603.27153; notes:
shared/papers/precond_attention.md) as data, checked by the pipeline into ``paper_claims`` (``adaptlab.claims``).

Only the abstract and the Fig. 1 caption are readable; the paper publishes no number we could check, so every
claim is checked by direction. Choices that are ours, not the paper's:
- "The attention matrix" is the per-head output A_h = softmax(QK^T/sqrt(d_h)) V_h (the notes' reading), whose
  log10 kappa the precond runs probe before and after C (``attention_condition``, ``precond_runs``); kappa is
  averaged over probe steps, layers and heads.
- "Preconditioning" is every non-baseline arm of the config, pooled (``col``, ``row``, ``col`` with a detached
  C in the presets); comparisons with the baseline arm are paired by phase and seed.
- "Ill-conditioned" means mean log10 kappa > 2 (kappa > 100); "faster training" means a lower EMA train loss at
  a quarter of the run; "near-zero overhead" means less than 5 % more time per step than the baseline (the
  notes' CPU expectation; the paper states no number).
"""
from __future__ import annotations

from adaptlab.claims import Claim

# ok precond runs with their arm's baseline flag, and the baseline run of each (phase, seed)
_RUNS = """
    WITH r AS (SELECT p.*, x.precond_is_baseline AS is_base
               FROM precond_runs p JOIN runs x USING (run_id) WHERE p.status = 'ok'),
    b AS (SELECT phase, seed, log10_kappa_post AS base_kappa, loss_ema_q1 AS base_loss_q1 FROM r WHERE is_base)"""

CLAIMS: list[Claim] = [
    Claim(
        id="standard_attention_ill_conditioned",
        claim="Standard self-attention often produces ill-conditioned attention matrices with large condition "
              "numbers.",
        # mean log10 kappa of the baseline (standard attention) arm over training; > 2 means kappa > 100 (ours)
        sql=f"""{_RUNS}
            SELECT avg(log10_kappa_pre), count(log10_kappa_pre) FROM r WHERE is_base""",
        direction=">", threshold=2.0),
    Claim(
        id="conditioning_matrix_lowers_kappa",
        claim="Multiplying each head's attention matrix by the diagonal conditioning matrix C reduces its condition "
              "number.",
        # within each preconditioned run: log10 kappa(A C) - log10 kappa(A), same probe batch, mean over runs
        sql=f"""{_RUNS}
            SELECT avg(log10_kappa_post - log10_kappa_pre), count(log10_kappa_post - log10_kappa_pre)
            FROM r WHERE NOT is_base""",
        direction="<", threshold=0.0),
    Claim(
        id="kappa_below_standard_attention",
        claim="Preconditioned attention trains with better-conditioned attention matrices than standard attention.",
        # log10 kappa(A C) of a preconditioned run minus log10 kappa(A) of the baseline run of the same phase and
        # seed (each averaged over training), mean over preconditioned runs
        sql=f"""{_RUNS}
            SELECT avg(r.log10_kappa_post - b.base_kappa), count(r.log10_kappa_post - b.base_kappa)
            FROM r JOIN b USING (phase, seed) WHERE NOT r.is_base""",
        direction="<", threshold=0.0),
    Claim(
        id="faster_training",
        claim="Preconditioned attention improves training efficiency: the training loss decreases faster than with "
              "standard attention.",
        # EMA train loss at a quarter of the run, preconditioned minus baseline (same phase and seed)
        sql=f"""{_RUNS}
            SELECT avg(r.loss_ema_q1 - b.base_loss_q1), count(r.loss_ema_q1 - b.base_loss_q1)
            FROM r JOIN b USING (phase, seed) WHERE NOT r.is_base""",
        direction="<", threshold=0.0),
    Claim(
        id="negligible_overhead",
        claim="Preconditioning is a cheap drop-in replacement: it adds almost no time per training step.",
        # time-per-step overhead over the baseline arm (%, median over the timing run's interleaved repeats), mean
        # over the preconditioned arms; < 5 % is ours
        sql="""
            WITH a AS (SELECT arm, any_value(overhead_pct) AS overhead_pct FROM precond_summary
                       WHERE arm NOT IN (SELECT precond_arm FROM runs WHERE kind = 'precond' AND precond_is_baseline)
                       GROUP BY arm)
            SELECT avg(overhead_pct), count(overhead_pct) FROM a""",
        direction="<", threshold=5.0),
]
