"""Fused training: several same-shape runs as one batched model, trained by the one loop (``train.loop.fit``).

``FusedRuns`` stacks the runs' models (as ``torch.func.stack_module_state`` does: every tensor gains a leading run
dimension) and vmaps the task's loss over them (``torch.func.vmap`` + ``functional_call``), each run with its own
batch (its seed's data order). What a run owns stays its own: its lr, its trainable set (a frozen tensor's
gradient is zeroed and its update masked, so it stays bit-identical and gets no weight decay), its head init and
data order (its seed), its optimizer moments, its gradient clipping (the norm over its own trainable tensors), its
divergence (it stops updating; the others go on), its best-val weights and its checkpoint file in its own run
directory. Evaluation runs each run's own model, with the run's current weights copied in.

The optimizers are the stacked forms of SGD and the Adam family (``train.stacked``: per-run lr, and per-run
Adam / AdamW / AdamO with their own decay and λ); they follow the one-run update formulas, so a fused run matches
its one-by-one twin within float tolerance (tests/test_fused.py). Any other optimizer trains unfused.

On the CPU a group's step (forward, backward, optimizer) runs its float32 matmuls on oneDNN where that keeps them
float32 (``train.device.onednn_float32_matmul``): on this repo's AMD cores about twice MKL's rate for a group's
batched shapes. A run alone and evaluation keep torch's default kernels.

Written by hand: the masks and the group around the loop (the stacked optimizers: ``train.stacked``).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.func import functional_call, vmap

from adaptlab.train.checkpoint import read_checkpoint, write_checkpoint
from adaptlab.train.device import (autocast, explicit_attention, explicit_attention_for_cpu_bf16,
                                   onednn_float32_matmul)
from adaptlab.train.grouped import grouped_forward
from adaptlab.train.stacked import FUSED_OPTIMIZERS, StackedOptimizer, isometry_matrices, per_run


def _stack(batches):
    """The runs' batches (tensors, or tuples/lists/dicts of them) stacked along a new leading run dimension."""
    first = batches[0]
    if torch.is_tensor(first):
        return torch.stack(batches)
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in batches]) for k in first}
    return type(first)(_stack(list(parts)) for parts in zip(*batches))


class _Bound:
    """A template module called with one run's parameters (inside vmap, a slice of the stacked ones)."""

    def __init__(self, base, params, buffers):
        self.base, self.params, self.buffers = base, params, buffers

    def __call__(self, *args, **kwargs):
        return functional_call(self.base, (self.params, self.buffers), args, kwargs)

    def named_parameters(self):
        """The run's parameters by name (a loss term over the weights, e.g. continual's coupled isometry)."""
        return iter(self.params.items())


class FusedRuns:
    """The runs of a fused pack as one group for ``fit``: ``models[r]`` (built, initialised and with its trainable
    set chosen exactly as the run would be on its own), ``tasks[r]`` and ``lrs[r]`` per run; ``cfg`` (all other
    training values) is shared, except what ``run_cfgs[r]`` (default: ``cfg`` for every run) holds apart per run:
    its optimizer within the Adam family, weight decay and isometry λ (``train.stacked.PER_RUN_KEYS``). After ``fit`` each ``models[r]`` holds its run's weights, as after a run alone.

    A group can go on through several ``fit`` calls (a continual sequence: ``set_tasks`` between them; the
    optimizer moments carry over); a run ``retire``d there takes no more steps. A task class may define
    ``loss_and_aux(model, batch) -> (loss, aux)`` and ``take_aux(value)``: the per-run scalar ``aux`` (continual's
    online accuracy) is computed in the batched loss and handed to each run's task after the step's forward; a
    static ``stacked_batches(tasks)`` may return ``draw(step, batch_size)``, the runs' stacked ``train_batch``es drawn
    at once.

    When the model has a grouped forward (``train.grouped``) and the task class defines ``model_input(batch)`` and
    ``grouped_loss(outputs, batch, params) -> losses`` (``grouped_loss_and_aux`` -> (losses, aux) where it has
    ``loss_and_aux``: the same formulas over the runs' stacked outputs, one value per run), the group's step runs
    them instead of vmap: one op per layer for all runs."""

    fused = True

    def __init__(self, models: list[torch.nn.Module], tasks: list, lrs: list[float], cfg: dict, device: torch.device,
                 run_cfgs: list[dict] | None = None):
        if cfg["optimizer"] not in FUSED_OPTIMIZERS:
            raise ValueError(f"optimizer {cfg['optimizer']!r} cannot train fused (fused: {FUSED_OPTIMIZERS})")
        run_cfgs = run_cfgs or [cfg] * len(models)
        self.models, self.device, self.n = models, device, len(models)
        self.precision = cfg.get("precision", "auto")  # one value per group: fuse keys hold the train config
        self.retired: set[int] = set()
        for m in models:  # each run's own model evaluates it
            m.to(device).train()
            explicit_attention_for_cpu_bf16(m, device, self.precision)
        named = [dict(m.named_parameters()) for m in models]
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        for r, sh in enumerate(shapes[1:], start=1):
            if sh != shapes[0]:
                diff = sorted(k for k in sh.keys() | shapes[0].keys() if sh.get(k) != shapes[0].get(k))
                raise ValueError(f"fused runs must share their shapes: run {r} differs from run 0 in {diff[:3]}")
        self.masks = {k: torch.tensor([nm[k].requires_grad for nm in named], device=device) for k in named[0]}
        # torch.func.stack_module_state, but the runs' trainable sets may differ (it insists they agree)
        self.params = {k: torch.stack([nm[k].detach() for nm in named]).requires_grad_(bool(self.masks[k].any()))
                       for k in named[0]}
        for k, trains in self.masks.items():  # a weight some runs freeze: its gradient over the span that trains it
            runs = trains.nonzero().flatten().tolist()
            if runs and (runs[0], runs[-1] + 1) != (0, self.n):
                self.params[k].grad_runs = (runs[0], runs[-1] + 1)
        self.buffers = {k: torch.stack([dict(m.named_buffers())[k] for m in models]) for k, _ in models[0].named_buffers()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.grouped = grouped_forward(self.base)  # one op per layer for all runs (train.grouped), else vmap
        explicit_attention(self.base)  # scaled_dot_product_attention has no vmap rule on CPU
        self.base_lrs = torch.tensor(lrs, dtype=torch.float64, device=device)
        self.opt = StackedOptimizer(self.params, self.masks, self.base_lrs.float(), cfg,
                                    isometry_matrices(models, run_cfgs), run_cfgs)
        self.set_tasks(tasks)

    def set_tasks(self, tasks: list) -> None:
        """The runs' tasks of the next ``fit`` (one class; its loss is vmapped with ``tasks[0]`` as ``self``)."""
        self.tasks, self.selection_metric = tasks, tasks[0].selection_metric
        # the runs' batches: the task class's stacked draw where it has one, else each run's train_batch stacked
        stacked = getattr(type(tasks[0]), "stacked_batches", None)
        self._draw = stacked(tasks) if stacked is not None else None
        self._aux = hasattr(type(tasks[0]), "loss_and_aux")
        loss = type(tasks[0]).loss_and_aux if self._aux else type(tasks[0]).loss
        self._losses = vmap(lambda p, b, batch: loss(tasks[0], _Bound(self.base, p, b), batch))
        # grouped: the model's outputs for all runs at once (train.grouped), and the task's losses from them
        self._grouped_loss = self.grouped is not None and hasattr(
            type(tasks[0]), "grouped_loss_and_aux" if self._aux else "grouped_loss")

    def retire(self, r: int) -> None:
        """Run ``r`` takes no more steps in later ``fit`` calls (its sequence ended): its loss reads as NaN, so each
        fit stops it at its first step, as a diverged run."""
        self.retired.add(r)

    def set_lr(self, factor: float) -> list[float]:
        self.opt.lr = (self.base_lrs * factor).float()
        return (self.base_lrs * factor).tolist()

    def losses(self, step: int, batch_size: int):
        batch = (self._draw(step, batch_size) if self._draw is not None else
                 _stack([t.train_batch(step, batch_size) for t in self.tasks]))
        with autocast(self.device, self.precision), onednn_float32_matmul(self.device):
            if self._grouped_loss:
                task = self.tasks[0]
                outputs = self.grouped(self.base, self.params, task.model_input(batch))
                grouped_loss = task.grouped_loss_and_aux if self._aux else task.grouped_loss
                loss = grouped_loss(outputs, batch, self.params)
            else:
                loss = self._losses(self.params, self.buffers, batch)
        if self._aux:
            loss, aux = loss
            for task, value in zip(self.tasks, aux.detach().float().tolist()):
                task.take_aux(value)
        values = loss.detach().float().tolist()
        return loss, [math.nan if r in self.retired else v for r, v in enumerate(values)]

    def backward_clip(self, loss: torch.Tensor, values: list[float], clip: float) -> list[float]:
        ok = torch.tensor([v == v and abs(v) != float("inf") for v in values], device=self.device)
        for p in self.params.values():
            p.grad = None
        with onednn_float32_matmul(self.device):
            torch.where(ok, loss, torch.zeros_like(loss)).sum().backward()
        values_ok = ok.tolist()
        masked = not (all(values_ok) and self.opt.all_trainable())  # else every gradient is every run's own
        norms = []  # per tensor, one norm per run; a run's norm is over its tensors' norms
        for name, p in self.params.items():
            if p.grad is None:
                continue
            if masked:  # frozen in a run: no gradient there (a diverged run's NaN stays out too)
                p.grad = torch.where(per_run(self.masks[name] & ok, p), p.grad, torch.zeros_like(p.grad))
            norms.append(torch.linalg.vector_norm(p.grad.flatten(1), dim=1))
        return self._clipped(torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1), clip, values_ok)

    def _clipped(self, total: torch.Tensor, clip: float, ok: list[bool]) -> list[float]:
        """Scale each run's gradients to norm ≤ ``clip``; the pre-clip norms (NaN for a run not stepping)."""
        if clip != math.inf:  # no clipping: the norms alone (a rescale by 1 changes nothing)
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(per_run(coef, p))
        return [n if o else float("nan") for n, o in zip(total.tolist(), ok)]

    def step(self, active: list[bool]) -> None:
        with onednn_float32_matmul(self.device):  # AdamO's isometry step: a Gram and a product per matrix
            self.opt.step(torch.tensor(active, device=self.device))

    @torch.no_grad()
    def sync(self, r: int) -> None:
        """Copy run ``r``'s current weights into its own model."""
        for name, p in self.models[r].named_parameters():
            p.copy_(self.params[name][r])
        for name, b in self.models[r].named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name][r])

    def task_of(self, r: int):
        return self.tasks[r]

    @torch.no_grad()
    def push(self, r: int) -> None:
        """Copy run ``r``'s own model into its slice (after a change made to the model, e.g. at a task boundary)."""
        for name, p in self.models[r].named_parameters():
            self.params[name][r].copy_(p)
        for name, b in self.models[r].named_buffers():
            if name in self.buffers:
                self.buffers[name][r].copy_(b)

    def optimizer_view(self, r: int):
        """Run ``r``'s optimizer state as a torch optimizer's ``state`` (keyed by ``models[r]``'s parameters), its
        tensors views of the stacked moments: an in-place change (ReDo's reset of a unit's moments) is the run's."""
        params = dict(self.models[r].named_parameters())
        state = {params[name]: {key: t[r] for key, t in st.items()} for name, st in self.opt.state.items()}
        return SimpleNamespace(state=state)

    def evaluate(self, r: int, split: str) -> dict[str, float]:
        return self.tasks[r].evaluate(self.models[r], split, autocast=lambda: autocast(self.device, self.precision))

    def trainable_state(self, r: int) -> dict[str, torch.Tensor]:
        from adaptlab.train.loop import _trainable_state

        return _trainable_state(self.models[r])

    def load_trainable(self, r: int, state: dict[str, torch.Tensor]) -> None:
        self.models[r].load_state_dict(state, strict=False)

    def save_checkpoint(self, r: int, path: Path, log: dict, meta: dict) -> None:
        """Run ``r``'s slice: its weights, its optimizer moments, the RNG and its log, in its own directory."""
        tensors = {f"model/{k}": v[r].detach().cpu().contiguous() for k, v in {**self.params, **self.buffers}.items()}
        tensors.update({f"optim/{k}": v.cpu() for k, v in self.opt.state_of(r).items()})
        write_checkpoint(path, tensors, log, {"meta": meta, "fused_t": self.opt.t})

    @torch.no_grad()
    def load_checkpoint(self, r: int, path: Path) -> tuple[dict, dict]:
        header, tensors, log = read_checkpoint(path)
        for key, val in tensors.items():
            if key.startswith("model/"):
                name = key[len("model/"):]
                (self.params.get(name, self.buffers.get(name)))[r].copy_(val)
        self.opt.load_state_of(r, {k[len("optim/"):]: v.to(self.device) for k, v in tensors.items()
                                   if k.startswith("optim/")}, header["fused_t"])
        return header["meta"], log


def fused_config_id(config_id: str) -> str:
    """The checkpoint id of a run trained fused: its checkpoints hold a slice, not a one-run checkpoint."""
    return f"{config_id}:fused"
