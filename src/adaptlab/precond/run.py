"""One run of the precond study, its condition-number probe and the interleaved step-time measurement.

A run trains one attention arm (timm baseline or a preconditioned form) for one seed, either from scratch
(phase ``pretrain``) or from the study's backbone weights (phase ``finetune``), through the shared ``fit``.
All arms of a seed share the initialisation (same seed, and the preconditioned layer adds no parameters)
and the data order (batches are a pure function of seed and step). Every ``probe.every`` steps (and at step
0) the probe runs a fixed batch (the first val images) and logs, per layer and head, kappa of the head
output A before and after C (float64 singular values; geometric mean over the probe images).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from adaptlab.config import config_hash, train_config
from adaptlab.data.store import load_dataset
from adaptlab.models.precond_attention import PreconditionedAttention, condition_number, head_outputs, precondition
from adaptlab.models.vit import create_vit, load_model_weights
from adaptlab.precond.schema import CONDITION_SCHEMA, LOSS_SCHEMA, SUMMARY_FIELDS, TIMING_SCHEMA
from adaptlab.runner import Run, execute
from adaptlab.train.loop import fit
from adaptlab.train.optim import build_optimizer
from adaptlab.train.tasks import ImageClassification

@torch.no_grad()
def attention_kappas(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, int, float, float]]:
    """(layer, head, kappa_pre, kappa_post) of every attention head on the batch ``x``, in eval mode.

    The input of each block's attention is caught by a hook and A recomputed from it by ``head_outputs``, so
    timm's Attention (kappa_post = kappa_pre: no C) and PreconditionedAttention are measured the same way.
    kappa is the geometric mean over the images of the batch, capped at 1e16.
    """
    inputs: dict[int, torch.Tensor] = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, blk in enumerate(model.blocks)]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rows = []
    for i, blk in enumerate(model.blocks):
        # A is recomputed in float64 from the block's input: float32 round-off alone bounds kappa near 1e7, and
        # near-uniform attention makes A close to rank one, with kappa well above that
        attn = copy.deepcopy(blk.attn).double().eval()
        o = head_outputs(attn, inputs[i].double())  # (B, H, N, d_h)
        pre = condition_number(o)
        post = pre
        if isinstance(attn, PreconditionedAttention) and attn.precond:
            post = condition_number(precondition(o, attn.form, attn.eps))
        gmean = lambda k: 10 ** k.log10().mean(0)  # noqa: E731 - over the batch, per head
        for h, (kp, kq) in enumerate(zip(gmean(pre).tolist(), gmean(post).tolist())):
            rows.append((i, h, kp, kq))
    return rows


class ConditionProbe:
    """``on_step`` callback: every ``every`` steps, kappa per layer and head on a fixed batch, to Parquet.

    The file is rewritten at every probe, and rows at or after the probed step are replaced, so a resumed run
    keeps the rows from before its checkpoint and a restarted one starts clean.
    """

    def __init__(self, model, x: torch.Tensor, every: int, path: Path, run_id: str):
        self.model, self.x, self.every, self.path, self.run_id = model, x, every, Path(path), run_id
        self.rows = pq.read_table(self.path).to_pylist() if self.path.exists() else []

    def __call__(self, step: int) -> None:
        if step % self.every:
            return
        self.rows = [r for r in self.rows if r["step"] < step]
        self.rows += [{"run_id": self.run_id, "step": step, "layer": l, "head": h, "kappa_pre": a, "kappa_post": b}
                      for l, h, a, b in attention_kappas(self.model, self.x)]
        pq.write_table(pa.Table.from_pylist(self.rows, schema=CONDITION_SCHEMA), self.path)


def ema(values: list[float], decay: float) -> list[float]:
    """Exponential moving average started at the first value (no zero-init bias)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None or not math.isfinite(acc) else decay * acc + (1 - decay) * v
        out.append(acc)
    return out


def _at_fraction(values: list[float], frac: float) -> float | None:
    return values[max(0, math.ceil(frac * len(values)) - 1)] if values else None


def run_precond(spec: dict, data_path: str | Path, weights: str | Path | None, out_dir: str | Path, *,
                device: str = "auto", threads: int = 1) -> dict:
    """Train one (phase, arm, seed) of the study; write summary, steps, precond_loss and attention_condition."""
    cfg = spec["train"]
    identity = {"run_id": spec["run_id"], "kind": "precond", "study": "precond", "grid": f"precond_{spec['phase']}",
                "backbone": spec["backbone"], "dataset": spec["dataset"], "seed": spec["seed"], "lr": cfg["lr"],
                "optimizer": cfg["optimizer"], "trainable": "full"}

    def body(run: Run) -> None:
        run.extra.update(precond_phase=spec["phase"], precond_arm=spec["arm"],
                         precond_is_baseline=spec["arm"] == spec["baseline"],
                         precond_threshold_factor=spec["threshold_factor"])
        data = load_dataset(data_path)
        torch.manual_seed(spec["seed"])  # same seed, same init in every arm (C has no parameters)
        run.model = model = create_vit(spec["model"], data.num_classes)
        if spec["phase"] == "finetune":
            load_model_weights(model, weights, skip_head=True)  # strict on the backbone: no new parameters
        task = ImageClassification(data, model.patch_embed.img_size[0], run.device, spec["seed"],
                                   mean=spec["model"]["mean"], std=spec["model"]["std"],
                                   eval_batch_size=cfg["eval_batch_size"], hflip=cfg["hflip"])
        probe_x = task._prepare(task._x["val"][:spec["probe"]["batch_size"]])
        probe = ConditionProbe(model.to(run.device), probe_x, spec["probe"]["every"],
                               run.out_dir / "attention_condition.parquet", spec["run_id"])
        probe(0)
        last, intervals = [time.perf_counter()], []

        def on_step(step: int) -> None:
            intervals.append(time.perf_counter() - last[0])
            probe(step)
            last[0] = time.perf_counter()

        run.result = fit(model, task, cfg, run.out_dir, device=run.device, config_id=config_hash(spec),
                         on_step=on_step)
        losses = ema(run.result.log["loss"], spec["ema"])
        run.tables["precond_loss"] = ([{"run_id": spec["run_id"], "step": st, "loss": l, "loss_ema": e}
                                       for st, l, e in zip(run.result.log["step"], run.result.log["loss"], losses)],
                                      LOSS_SCHEMA)
        run.extra.update(precond_loss_ema_q1=_at_fraction(losses, 0.25), precond_loss_ema_q2=_at_fraction(losses, 0.5),
                         precond_loss_ema_end=_at_fraction(losses, 1.0),
                         precond_sec_per_step=statistics.median(intervals) if intervals else None)

    return execute(identity, spec, out_dir, body, steps_planned=cfg["steps"], device=device, threads=threads,
                   on_error=spec.get("on_error", "record"), extra_fields=SUMMARY_FIELDS,
                   inputs=[p for p in (data_path, weights) if p])


def time_arms(model_cfg: dict, arms: dict[str, dict], *, num_classes: int = 10, batch_size: int = 64,
              steps: int = 20, repeats: int = 5, warmup: int = 3, seed: int = 0) -> list[tuple[str, int, float]]:
    """Seconds per training step (forward, backward, AdamW step) of each arm, measured interleaved.

    Every repeat times ``steps`` steps of each arm in turn, the arm order rotating between repeats, so load
    changes of a shared machine hit all arms alike. Returns (arm, repeat, seconds per step) rows.
    """
    names = list(arms)
    models, opts = {}, {}
    for name in names:
        torch.manual_seed(seed)
        models[name] = create_vit({**model_cfg, "attention": arms[name]}, num_classes).train()
        opts[name] = build_optimizer(models[name].parameters(), train_config({"optimizer": "adamw", "lr": 1e-3,
                                                                               "weight_decay": 0.05}))
    g = torch.Generator().manual_seed(seed)
    size = models[names[0]].patch_embed.img_size[0]  # the model's own: a timm_name model ignores img_size
    x = torch.randn(batch_size, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)

    def train(name: str, n: int) -> float:
        model, opt = models[name], opts[name]
        t = time.perf_counter()
        for _ in range(n):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / n

    for name in names:
        train(name, warmup)
    rows = []
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            rows.append((name, r, train(name, steps)))
    return rows


def run_timing(spec: dict, out_dir: str | Path, *, threads: int = 1) -> dict:
    """The study's timing run: ``time_arms`` on the CPU, written to precond_timing.parquet and a summary."""
    tm = spec["timing"]
    identity = {"run_id": spec["run_id"], "kind": "precond_timing", "study": "precond", "grid": "precond_timing",
                "backbone": spec["backbone"], "dataset": None, "seed": 0, "lr": None, "optimizer": "adamw",
                "trainable": "full"}

    def body(run: Run) -> None:
        run.status = "ok"
        run.extra.update({f.name: None for f in SUMMARY_FIELDS})
        rows = time_arms(spec["model"], spec["arms"], batch_size=tm["batch_size"], steps=tm["steps"],
                         repeats=tm["repeats"])
        run.tables["precond_timing"] = ([{"run_id": spec["run_id"], "arm": a, "repeat": r, "sec_per_step": s}
                                         for a, r, s in rows], TIMING_SCHEMA)

    return execute(identity, spec, out_dir, body, steps_planned=tm["steps"] * tm["repeats"] * len(spec["arms"]),
                   device="cpu", threads=threads, on_error="raise", extra_fields=SUMMARY_FIELDS)


# rule -> the job: (spec, named inputs, params, run directory, threads); workflow/scripts/study_run.py calls it
RULES = {
    "precond_train": lambda spec, i, p, out, threads: run_precond(spec, i["data"], i.get("model"), out,
                                                                   device=p["device"], threads=threads),
    "precond_timing": lambda spec, i, p, out, threads: run_timing(spec, out, threads=threads),
}
