"""The PEFT paper's claims (Abou Baker, Rohrschneider, Handmann, MAKE 2024, arXiv 2606.01947; notes:
shared/papers/peft.md) as data, checked by the pipeline into ``paper_claims`` (``adaptlab.claims``).

The paper's AP tables are not readable; its claims are qualitative, except the share of trainable parameters.
Choices that are ours, not the paper's:
- PEFT arms are the ``adapter`` and ``lora`` methods; "traditional fine-tuning" is ``full`` and ``partial``.
- Arms are compared on each task's metric (accuracy, or mask AP for segmentation), mean over seeds
  (``peft_results``), as a relative difference in % so that tasks with different metrics can be averaged.
- "Competitive" means the best PEFT arm is at most 10 % (relative) below the best traditional arm.
- "Most parameter-efficient" means the highest metric per trainable % (metric_mean / trainable_pct) among the
  PEFT arms of a segmentation task; our trainable % counts the task head, as the paper's does.
"""
from __future__ import annotations

from adaptlab.claims import Claim

_PEFT = "('adapter', 'lora')"
_TRADITIONAL = "('full', 'partial')"
_DEFORMABLE = "'sampling_offsets|attention_weights|value_proj|output_proj'"  # LoRA targets inside MSDeformAttn

CLAIMS: list[Claim] = [
    Claim(
        id="peft_trains_1_to_6_pct",
        claim="Parameter-efficient fine-tuning (adapters, LoRA) trains only about 1-6 % of the parameters.",
        # mean trainable % (trainable / all parameters incl. the added ones) of the PEFT arms; the paper's range
        # 1-6 % written as its centre 3.5 ± 2.5
        sql=f"""
            SELECT avg(trainable_pct), count(trainable_pct) FROM peft_results
            WHERE method IN {_PEFT} AND n_ok > 0""",
        published=3.5, tolerance=2.5),
    Claim(
        id="peft_competitive_with_finetuning",
        claim="PEFT is competitive with traditional fine-tuning while training far fewer parameters.",
        # per task: 100 x (best PEFT metric - best full/partial metric) / best full/partial metric; mean over tasks
        sql=f"""
            WITH t AS (SELECT task, max(metric_mean) FILTER (WHERE method IN {_PEFT}) AS peft,
                              max(metric_mean) FILTER (WHERE method IN {_TRADITIONAL}) AS trad
                       FROM peft_results WHERE n_ok > 0 GROUP BY task)
            SELECT avg(100 * (peft - trad) / trad), count(peft - trad) FROM t WHERE trad > 0""",
        direction=">", threshold=-10.0),
    Claim(
        id="two_three_adapters_beat_one",
        claim="Two or three adapters per block perform better than a single adapter.",
        # per task: 100 x (mean metric with 2-3 adapters - metric with 1) / metric with 1; mean over tasks
        sql="""
            WITH t AS (SELECT task, avg(metric_mean) FILTER (WHERE n_adapters IN (2, 3)) AS many,
                              avg(metric_mean) FILTER (WHERE n_adapters = 1) AS one
                       FROM peft_adapter_depth WHERE n_ok > 0 GROUP BY task)
            SELECT avg(100 * (many - one) / one), count(many - one) FROM t WHERE one > 0""",
        direction=">", threshold=0.0),
    Claim(
        id="deformable_lora_most_efficient",
        claim="LoRA on multi-scale deformable attention is the most parameter-efficient PEFT option for instance "
              "segmentation.",
        # per segmentation task: best metric-per-trainable-% of the deformable-LoRA arms / best of the other PEFT
        # arms; mean over tasks
        sql=f"""
            WITH a AS (SELECT task, metric_mean / trainable_pct AS eff,
                              method = 'lora' AND regexp_matches(coalesce(lora_targets, ''), {_DEFORMABLE}) AS deform
                       FROM peft_results
                       WHERE n_ok > 0 AND method IN {_PEFT} AND task_kind = 'segmentation' AND trainable_pct > 0),
            t AS (SELECT task, max(eff) FILTER (WHERE deform) AS deform_eff,
                         max(eff) FILTER (WHERE NOT deform) AS other_eff
                  FROM a GROUP BY task)
            SELECT avg(deform_eff / other_eff), count(deform_eff / other_eff) FROM t WHERE other_eff > 0""",
        direction=">", threshold=1.0),
]
