"""The one training loop: pretraining, finetuning and every study run through ``fit``.

nanoGPT-style: a plain loop, no framework. Per step: set the scheduled lr, draw the batch for this step,
forward (bf16 autocast on CUDA), stop as ``diverged`` on a non-finite loss or gradient, clip the global
gradient norm over the trainable parameters (the pre-clip norm is logged), step. Every ``eval_every`` steps
the task is evaluated on val and the best-val trainable weights are kept in ``best.safetensors``; every
``ckpt_every`` steps a resumable checkpoint is written, and at the step where a stop signal arrived
(``adaptlab.preemption``: SIGTERM/SIGUSR1 from SLURM), after which ``Preempted`` is raised. At the end the
best-val weights are restored and the test split is evaluated once.
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
from adaptlab.train.device import autocast, compile_model
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


def fit(model: torch.nn.Module, task, cfg: dict, run_dir: str | Path, *, device: torch.device,
        config_id: str, on_step: Callable[[int], None] | None = None,
        optimizer: torch.optim.Optimizer | None = None) -> FitResult:
    """Train ``model`` on ``task`` with the hyperparameters ``cfg`` (see config.TRAIN_DEFAULTS).

    ``config_id`` identifies the run's full configuration: a checkpoint written under another id is ignored,
    so a changed config never resumes a stale run. ``optimizer``: an existing optimizer to go on with (its
    moments carry over, e.g. across the tasks of a continual run); its groups' ``initial_lr`` (set on first
    use) is the base lr the schedule scales. Default: a fresh one from ``cfg``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, best_path = run_dir / CKPT_NAME, run_dir / BEST_NAME
    model.to(device).train()
    if cfg.get("compile"):  # train.compile: torch.compile in place (same state_dict keys, so checkpoints carry over)
        compile_model(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if optimizer is None:
        opt = build_optimizer(named, cfg)
        base_lrs = [g["lr"] for g in opt.param_groups]
    else:
        opt = optimizer
        base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in opt.param_groups]
    sel = task.selection_metric

    log: dict[str, list[float]] = {"step": [], "loss": [], "lr": [], "grad_norm": []}
    state = {"step": 0, "best_val": None, "best_step": None, "best_metrics": {}, "elapsed": 0.0, "config_id": config_id}
    resumed_from = 0
    if ckpt_path.exists() and read_checkpoint_meta(ckpt_path).get("config_id") == config_id:
        state, log = load_checkpoint(ckpt_path, model, opt)
        resumed_from = state["step"]

    clip = cfg["clip_grad"] if cfg["clip_grad"] else math.inf
    status, final_loss = "ok", None
    t_start = t_process = time.perf_counter()
    start_step = state["step"]

    def add_row(values: dict[str, float]) -> None:
        n = len(log["step"])
        for key, val in values.items():
            if key not in log:
                log[key] = [math.nan] * n
            log[key].append(val)
        for key in log:
            if len(log[key]) == n:
                log[key].append(math.nan)

    def checkpoint() -> None:
        """The resumable checkpoint at ``state['step']``, its training time so far included."""
        nonlocal t_start
        state["elapsed"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        save_checkpoint(ckpt_path, model, opt, log, {**state, "config_id": config_id})

    for step in range(start_step, cfg["steps"]):
        factor = lr_factor(step, cfg)
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * factor
        batch = task.train_batch(step, cfg["batch_size"])
        with autocast(device):
            loss = task.loss(model, batch)
        final_loss = loss.item()
        grad_norm = math.nan
        if math.isfinite(final_loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        done = step + 1
        row = {"step": done, "loss": final_loss, "lr": base_lrs[0] * factor, "grad_norm": grad_norm}
        if not (math.isfinite(final_loss) and math.isfinite(grad_norm)):
            status = "diverged"
            add_row(row)
            state["step"] = done
            break
        opt.step()
        if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
            metrics = task.evaluate(model, "val", autocast=lambda: autocast(device))
            row.update({f"val_{k}": v for k, v in metrics.items()})
            if state["best_val"] is None or metrics[sel] > state["best_val"]:
                state.update(best_val=metrics[sel], best_step=done, best_metrics=metrics)
                save_file(_trainable_state(model), str(best_path))
        add_row(row)
        state["step"] = done
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

    state["elapsed"] += time.perf_counter() - t_start
    seconds = time.perf_counter() - t_process
    test = None
    if status == "ok" and state["best_step"] is not None:
        model.load_state_dict(load_file(str(best_path)), strict=False)
        test = task.evaluate(model, "test", autocast=lambda: autocast(device))
    return FitResult(
        status=status, steps_done=state["step"], best_step=state["best_step"], best_val=state["best_metrics"],
        test=test, final_loss=final_loss, log=log, elapsed_seconds=state["elapsed"],
        steps_this_process=state["step"] - start_step, seconds_this_process=seconds, resumed_from=resumed_from,
    )
