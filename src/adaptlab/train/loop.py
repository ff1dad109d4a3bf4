"""The one training loop: pretraining, finetuning and every study run through ``fit``.

nanoGPT-style: a plain loop, no framework. Per step: set the scheduled lr, draw the batch for this step,
forward (bf16 autocast on CUDA, or wherever ``train.precision`` is ``bf16``), stop as ``diverged`` on a
non-finite loss or gradient, clip the global gradient norm over the trainable parameters (the pre-clip norm is
logged), step. Every ``eval_every`` steps the task is evaluated on val and the best-val trainable weights are
kept in ``best.safetensors``; every ``ckpt_every`` steps a resumable checkpoint is written (with the task's
``checkpoint_state()``, if it keeps per-step state of its own), and at the step where a stop signal arrived
(``adaptlab.preemption``: SIGTERM/SIGUSR1 from SLURM), after which ``Preempted`` is raised. At the end the
best-val weights are restored and the test split is evaluated once (a task whose ``test_is_val`` is true, its test
split the val set itself, takes the best-val metrics instead: the same weights on the same inputs).

The loop runs a *group* of runs: one run (``OneRun``: a model, its task and its optimizer), or several
same-shape runs trained as one batched model (``adaptlab.train.fused.FusedRuns``, fused training of a run
pack). Everything a run owns (lr, loss, gradient norm, divergence, best-val step, log, checkpoint, directory)
is kept per run; a run that diverges stops updating while the others go on.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from adaptlab import preemption
from adaptlab.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from adaptlab.train.device import autocast, compile_model, explicit_attention_for_cpu_bf16
from adaptlab.train.optim import build_optimizer, lr_factor

CKPT_NAME = "ckpt.safetensors"
BEST_NAME = "best.safetensors"


@dataclass
class FitResult:
    status: str  # "ok" | "diverged"
    steps_done: int
    best_step: int | None
    best_val: dict[str, float]
    test: dict[str, float] | None
    final_loss: float | None
    log: dict[str, list[float]]
    elapsed_seconds: float  # training time over all attempts (resumes add up)
    steps_this_process: int
    seconds_this_process: float
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float | None:
        if self.steps_this_process == 0 or self.seconds_this_process <= 0:
            return None
        return self.steps_this_process / self.seconds_this_process


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keep}


class OneRun:
    """One run as a group of one: the model, its task and its optimizer, stepped exactly as a plain loop would."""

    n = 1
    fused = False

    def __init__(self, model: torch.nn.Module, task, cfg: dict, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None):
        self.model, self.task, self.device = model, task, device
        self.precision = cfg.get("precision", "auto")  # not in TRAIN_DEFAULTS, like compile: see config.py
        model.to(device).train()
        explicit_attention_for_cpu_bf16(model, device, self.precision)
        if cfg.get("compile"):  # train.compile: torch.compile in place (same state_dict keys: checkpoints carry over)
            compile_model(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if optimizer is None:
            self.opt = build_optimizer(named, cfg)
            self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        else:  # its groups' ``initial_lr`` (set on first use) is the base lr the schedule scales
            self.opt = optimizer
            self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in self.opt.param_groups]
        self.selection_metric = task.selection_metric

    def set_lr(self, factor: float) -> list[float]:
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor
        return [self.base_lrs[0] * factor]

    def losses(self, step: int, batch_size: int) -> tuple[torch.Tensor, list[float]]:
        batch = self.task.train_batch(step, batch_size)
        with autocast(self.device, self.precision):
            loss = self.task.loss(self.model, batch)
        return loss, [loss.item()]

    def backward_clip(self, loss: torch.Tensor, values: list[float], clip: float) -> list[float]:
        if not math.isfinite(values[0]):
            return [math.nan]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip == math.inf:  # no clipping: the norm alone (clip_grad_norm_ would multiply every gradient by 1)
            grads = [p.grad for p in self.params if p.grad is not None]
            return [torch.nn.utils.get_total_norm(grads).item() if grads else 0.0]
        return [torch.nn.utils.clip_grad_norm_(self.params, clip).item()]

    def step(self, active: list[bool]) -> None:
        self.opt.step()

    def sync(self, r: int) -> None:
        """The model already holds the run's weights."""

    def task_of(self, r: int):
        return self.task

    def evaluate(self, r: int, split: str) -> dict[str, float]:
        return self.task.evaluate(self.model, split, autocast=lambda: autocast(self.device, self.precision))

    def trainable_state(self, r: int) -> dict[str, torch.Tensor]:
        return _trainable_state(self.model)

    def load_trainable(self, r: int, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def save_checkpoint(self, r: int, path: Path, log: dict, meta: dict) -> None:
        save_checkpoint(path, self.model, self.opt, log, meta)

    def load_checkpoint(self, r: int, path: Path) -> tuple[dict, dict]:
        return load_checkpoint(path, self.model, self.opt)


def _resume(runs, ckpt_paths: list[Path], config_ids: list[str]):
    """Each run's (state, log) from its checkpoint, when every run of the group has one written under its own
    config id at the same step (a group resumes together or not at all); else None."""
    metas = [read_checkpoint_meta(p) if p.exists() else None for p in ckpt_paths]
    if not all(m is not None and m.get("config_id") == cid for m, cid in zip(metas, config_ids)):
        return None
    if len({m["step"] for m in metas if m.get("status", "ok") == "ok"}) > 1:  # a diverged run stopped earlier
        return None
    return [runs.load_checkpoint(r, p) for r, p in enumerate(ckpt_paths)]


def fit(model, task, cfg: dict, run_dir, *, device: torch.device, config_id, on_step: Callable[[int], None] | None = None,
        optimizer: torch.optim.Optimizer | None = None):
    """Train ``model`` on ``task`` with the hyperparameters ``cfg`` (see config.TRAIN_DEFAULTS); a ``FitResult``.

    ``config_id`` identifies the run's full configuration: a checkpoint written under another id is ignored,
    so a changed config never resumes a stale run. ``optimizer``: an existing optimizer to go on with (its
    moments carry over, e.g. across the tasks of a continual run). Default: a fresh one from ``cfg``.

    Fused mode: ``model`` is a ``FusedRuns`` (it holds the runs' tasks; ``task`` is None), ``run_dir`` and
    ``config_id`` are lists with one entry per run, and the result is a list of ``FitResult``.
    """
    fused = getattr(model, "fused", False)
    runs = model if fused else OneRun(model, task, cfg, device, optimizer)
    dirs = [Path(d) for d in (run_dir if fused else [run_dir])]
    ids = list(config_id) if fused else [config_id]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    ckpt_paths, best_paths = [d / CKPT_NAME for d in dirs], [d / BEST_NAME for d in dirs]
    n, sel = runs.n, runs.selection_metric

    logs = [{"step": [], "loss": [], "lr": [], "grad_norm": []} for _ in range(n)]
    states = [{"step": 0, "best_val": None, "best_step": None, "best_metrics": {}, "elapsed": 0.0, "status": "ok"}
              for _ in range(n)]
    resumed_from = 0
    resumed = _resume(runs, ckpt_paths, ids)
    if resumed:
        states, logs = [s for s, _ in resumed], [lg for _, lg in resumed]
        for r, s in enumerate(states):
            s.setdefault("status", "ok")
            if "task_state" in s:
                runs.task_of(r).load_checkpoint_state(s.pop("task_state"))
        resumed_from = max(s["step"] for s in states)
    active = [s["status"] == "ok" for s in states]

    clip = cfg["clip_grad"] if cfg["clip_grad"] else math.inf
    # the last logged loss of a resumed run (one that stopped before the checkpoint, diverged, takes no more steps)
    final_losses: list[float | None] = [lg["loss"][-1] if lg["loss"] else None for lg in logs]
    t_start = t_process = time.perf_counter()
    start_step = resumed_from

    def add_row(r: int, values: dict[str, float]) -> None:
        log = logs[r]
        k = len(log["step"])
        for key, val in values.items():
            if key not in log:
                log[key] = [math.nan] * k
            log[key].append(val)
        for key in log:
            if len(log[key]) == k:
                log[key].append(math.nan)

    def checkpoint() -> None:
        """Every run's resumable checkpoint at its ``state['step']``, its training time so far included."""
        nonlocal t_start
        spent, t_start = time.perf_counter() - t_start, time.perf_counter()
        for r in range(n):
            states[r]["elapsed"] += spent
            task = runs.task_of(r)  # a task's own per-step state (continual's online accuracies) goes with it
            extra = {"task_state": task.checkpoint_state()} if hasattr(task, "checkpoint_state") else {}
            runs.save_checkpoint(r, ckpt_paths[r], logs[r], {**states[r], "config_id": ids[r], **extra})

    for step in range(start_step, cfg["steps"]):
        if not any(active):
            break
        lrs = runs.set_lr(lr_factor(step, cfg))
        loss, values = runs.losses(step, cfg["batch_size"])
        norms = runs.backward_clip(loss, [v if a else math.nan for v, a in zip(values, active)], clip)
        done = step + 1
        rows = {}
        for r in range(n):
            if not active[r]:
                continue
            final_losses[r] = values[r]
            rows[r] = {"step": done, "loss": values[r], "lr": lrs[r], "grad_norm": norms[r]}
            if not (math.isfinite(values[r]) and math.isfinite(norms[r])):
                states[r].update(status="diverged", step=done)  # it stops here; the others go on
                active[r] = False
                add_row(r, rows.pop(r))
        if not rows:
            break
        runs.step(active)
        evaluate = done % cfg["eval_every"] == 0 or done == cfg["steps"]
        for r, row in rows.items():
            if evaluate:
                runs.sync(r)
                metrics = runs.evaluate(r, "val")
                row.update({f"val_{k}": v for k, v in metrics.items()})
                if states[r]["best_val"] is None or metrics[sel] > states[r]["best_val"]:
                    states[r].update(best_val=metrics[sel], best_step=done, best_metrics=metrics)
                    save_file(runs.trainable_state(r), str(best_paths[r]))
            add_row(r, row)
            states[r]["step"] = done
        saved = bool(cfg["ckpt_every"]) and done % cfg["ckpt_every"] == 0 and done < cfg["steps"]
        if saved:
            checkpoint()
        if on_step is not None:
            on_step(done)
        stop = preemption.requested()
        if stop and done < cfg["steps"]:
            if not saved:  # this step's periodic checkpoint already holds it
                checkpoint()
            raise preemption.Preempted(stop, done)

    spent = time.perf_counter() - t_start
    seconds = time.perf_counter() - t_process
    results = []
    for r, state in enumerate(states):
        state["elapsed"] += spent
        runs.sync(r)
        test = None
        if state["status"] == "ok" and state["best_step"] is not None:
            runs.load_trainable(r, load_file(str(best_paths[r])))
            same = getattr(runs.task_of(r), "test_is_val", False)
            test = dict(state["best_metrics"]) if same else runs.evaluate(r, "test")
        results.append(FitResult(
            status=state["status"], steps_done=state["step"], best_step=state["best_step"],
            best_val=state["best_metrics"], test=test, final_loss=final_losses[r], log=logs[r],
            elapsed_seconds=state["elapsed"], steps_this_process=max(0, state["step"] - start_step),
            seconds_this_process=seconds, resumed_from=resumed_from,
        ))
    return results if fused else results[0]
