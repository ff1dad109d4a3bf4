"""Fused training: several same-shape runs as one batched model, trained by the one loop (``train.loop.fit``).

``FusedRuns`` stacks the runs' models (as ``torch.func.stack_module_state`` does: every tensor gains a leading run
dimension) and vmaps the task's loss over them (``torch.func.vmap`` + ``functional_call``), each run with its own
batch (its seed's data order). What a run owns stays its own: its lr, its trainable set (a frozen tensor's
gradient is zeroed and its update masked, so it stays bit-identical and gets no weight decay), its head init and
data order (its seed), its optimizer moments, its gradient clipping (the norm over its own trainable tensors), its
divergence (it stops updating; the others go on), its best-val weights and its checkpoint file in its own run
directory. Evaluation runs each run's own model, with the run's current weights copied in.

The optimizers are the stacked forms of torch's SGD (momentum, dampening 0) and Adam/AdamW, and of
``adaptlab.train.adamo.AdamO`` (Adam + the decoupled isometry step, one batched Gram per regularised matrix), with
the per-run lr as a tensor; they follow the one-run update formulas, so a fused run matches its one-by-one twin
within float tolerance (tests/test_fused.py). Any other optimizer trains unfused.

Written by hand: the stacked optimizers and the masks. torch.optim has no per-slice lr or mask, and neither
torch.func nor a well-kept library trains a batch of models with per-model optimizer state (HFTA, Wang et al.
MLSys 2021, rewrites layers instead).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.func import functional_call, vmap

from adaptlab.train.checkpoint import read_checkpoint, write_checkpoint
from adaptlab.train.device import autocast
from adaptlab.train.grouped import grouped_forward

FUSED_OPTIMIZERS = ("sgd", "adam", "adamw", "adamo")


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


def per_run(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-run vector (runs,) shaped to broadcast over a stacked tensor (runs, ...)."""
    return vec.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """SGD-momentum or Adam/AdamW over stacked tensors: per-run lr (``lr``: a tensor of shape [R]), and updates
    masked per run and tensor (trainable in that run and the run still active)."""

    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], lrs: torch.Tensor, cfg: dict,
                 isometry: dict[str, int] | None = None):
        self.params, self.masks, self.cfg, self.lr = params, masks, cfg, lrs.clone()
        self.kind = cfg["optimizer"]
        self.isometry = isometry or {}  # AdamO: {name: row-block split} of the regularised matrices
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.t = 0
        self._warned = False
        self._all_trainable: bool | None = None

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        cfg, self.t = self.cfg, self.t + 1
        if self.kind != "sgd" and self._uniform(active):
            return self._fused_step()
        for name, p in self.params.items():
            if p.grad is None:
                continue
            keep = per_run(self.masks[name] & active, p)
            lr, g = per_run(self.lr, p), p.grad
            wd = 0.0 if self.kind == "adamo" else cfg["weight_decay"]  # AdamO's only decay is the isometry step
            st = self.state.setdefault(name, {})
            if self.kind == "sgd":
                if wd:
                    g = g.add(p, alpha=wd)
                if cfg["momentum"]:
                    buf = st.get("momentum_buffer")
                    buf = g.clone() if buf is None else torch.where(keep, buf * cfg["momentum"] + g, buf)
                    st["momentum_buffer"] = buf
                    g = g + cfg["momentum"] * buf if cfg["nesterov"] else buf
                new = p - lr * g
            else:
                b1, b2 = cfg["betas"]
                # AdamO: ∇R at θ_t, before the Adam update, never in the moments (adamo.AdamO.step)
                iso = self._isometry_step(name, p, lr) if name in self.isometry else None
                new = p
                if wd and self.kind == "adamw":
                    new = p * (1 - lr * wd)
                elif wd:
                    g = g.add(p, alpha=wd)
                m = st.get("exp_avg", torch.zeros_like(p))
                v = st.get("exp_avg_sq", torch.zeros_like(p))
                st["exp_avg"] = torch.where(keep, m.lerp(g, 1 - b1), m)
                st["exp_avg_sq"] = torch.where(keep, torch.addcmul(v * b2, g, g, value=1 - b2), v)
                bc1, bc2 = 1 - b1 ** self.t, (1 - b2 ** self.t) ** 0.5
                denom = st["exp_avg_sq"].sqrt() / bc2 + cfg["eps"]
                new = new - (lr / bc1) * st["exp_avg"] / denom
                if iso is not None:
                    new = new - iso
            p.copy_(torch.where(keep, new, p))

    def all_trainable(self) -> bool:
        """Every run trains every tensor (nothing to mask)."""
        if self._all_trainable is None:
            self._all_trainable = all(bool(m.all()) for m in self.masks.values())
        return self._all_trainable

    def _uniform(self, active: torch.Tensor) -> bool:
        """Every run active, training every tensor, at one lr: the update is Adam's on the stacked tensors as they are."""
        return self.all_trainable() and bool(active.all()) and bool((self.lr == self.lr[0]).all())

    def _fused_step(self) -> None:
        """Adam/AdamW/AdamO on the stacked tensors in torch's fused kernel (one call; the same per-element formula
        as the masked update below, an elementwise update being the same on a stack as on each run's slice)."""
        cfg, lr = self.cfg, self.lr[0].item()
        names = [n for n, p in self.params.items() if p.grad is not None]
        params = [self.params[n] for n in names]
        iso = {n: self._isometry_step(n, p, per_run(self.lr, p)) for n, p in zip(names, params)
               if n in self.isometry}  # AdamO: ∇R at θ_t, before the Adam update
        for n, p in zip(names, params):
            st = self.state.setdefault(n, {})
            st.setdefault("exp_avg", torch.zeros_like(p))
            st.setdefault("exp_avg_sq", torch.zeros_like(p))
        wd = 0.0 if self.kind == "adamo" else cfg["weight_decay"]
        kernel = torch._fused_adamw_ if self.kind == "adamw" else torch._fused_adam_
        step = torch.tensor(float(self.t), device=params[0].device)
        b1, b2 = cfg["betas"]
        kernel(params, [p.grad for p in params], [self.state[n]["exp_avg"] for n in names],
               [self.state[n]["exp_avg_sq"] for n in names], [], [step] * len(params), lr=lr, beta1=b1, beta2=b2,
               weight_decay=wd, eps=cfg["eps"], amsgrad=False, maximize=False)
        for n, d in iso.items():
            if d is not None:
                self.params[n].sub_(d)

    def _isometry_step(self, name: str, p: torch.Tensor, lr: torch.Tensor) -> torch.Tensor | None:
        """η_iso·λ·∇R(W) of every run's slice (η_iso = ``isometry_lr_scale`` × the run's current lr)."""
        from adaptlab.train.adamo import isometry_grad, sigma_max_sq_bound, stability_check_due, warn_unstable

        lam, scale = self.cfg["isometry_lambda"], self.cfg["isometry_scale"]
        if not lam:
            return None
        coeff = self.cfg["isometry_lr_scale"] * lam * lr
        if not self._warned and stability_check_due(self.t):
            self._warned = warn_unstable(coeff.max().item(), sigma_max_sq_bound(p, batch_dims=1), scale)
        return coeff * isometry_grad(p, scale, self.isometry[name], batch_dims=1).to(p.dtype)

    def state_of(self, r: int) -> dict[str, torch.Tensor]:
        return {f"{name}/{key}": t[r].contiguous() for name, st in self.state.items() for key, t in st.items()}

    def load_state_of(self, r: int, tensors: dict[str, torch.Tensor], t: int) -> None:
        for key, val in tensors.items():
            name, slot = key.rsplit("/", 1)
            st = self.state.setdefault(name, {})
            if slot not in st:
                st[slot] = torch.zeros_like(self.params[name])
            st[slot][r].copy_(val)
        self.t = t


def _isometry(models: list[torch.nn.Module], cfg: dict) -> dict[str, int]:
    """AdamO: {name: split} of the matrices its isometry step regularises in any run, each run's trainable tensors
    selected (and checked) exactly as ``optim.build_optimizer`` selects them for the run alone."""
    if cfg["optimizer"] != "adamo":
        return {}
    from adaptlab.train.adamo import _check_lambda, select_isometry

    _check_lambda(cfg["isometry_lambda"], "fused AdamO")
    chosen: dict[str, int] = {}
    for m in models:
        trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        chosen.update(select_isometry(trainable, cfg["isometry_patterns"], cfg["isometry_exclude"]))
    return chosen


class FusedRuns:
    """The runs of a fused pack as one group for ``fit``: ``models[r]`` (built, initialised and with its trainable
    set chosen exactly as the run would be on its own), ``tasks[r]`` and ``lrs[r]`` per run; ``cfg`` (all other
    training values) is shared. After ``fit`` each ``models[r]`` holds its run's weights, as after a run alone.

    A group can go on through several ``fit`` calls (a continual sequence: ``set_tasks`` between them; the
    optimizer moments carry over); a run ``retire``d there takes no more steps. A task class may define
    ``loss_and_aux(model, batch) -> (loss, aux)`` and ``take_aux(value)``: the per-run scalar ``aux`` (continual's
    online accuracy) is computed in the batched loss and handed to each run's task after the step's forward.

    When the model has a grouped forward (``train.grouped``) and the task class defines ``model_input(batch)`` and
    ``grouped_loss_and_aux(outputs, batch, params) -> (losses, aux)`` (the same formulas over the runs' stacked
    outputs, one value per run), the group's step runs them instead of vmap: one op per layer for all runs."""

    fused = True

    def __init__(self, models: list[torch.nn.Module], tasks: list, lrs: list[float], cfg: dict, device: torch.device):
        if cfg["optimizer"] not in FUSED_OPTIMIZERS:
            raise ValueError(f"optimizer {cfg['optimizer']!r} cannot train fused (fused: {FUSED_OPTIMIZERS})")
        self.models, self.device, self.n = models, device, len(models)
        self.retired: set[int] = set()
        for m in models:
            m.to(device).train()
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
        self.buffers = {k: torch.stack([dict(m.named_buffers())[k] for m in models]) for k, _ in models[0].named_buffers()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.grouped = grouped_forward(self.base)  # one op per layer for all runs (train.grouped), else vmap
        for mod in self.base.modules():  # scaled_dot_product_attention has no vmap rule on CPU: the explicit form
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = False
        self.base_lrs = torch.tensor(lrs, dtype=torch.float64, device=device)
        self.opt = StackedOptimizer(self.params, self.masks, self.base_lrs.float(), cfg, _isometry(models, cfg))
        self.set_tasks(tasks)

    def set_tasks(self, tasks: list) -> None:
        """The runs' tasks of the next ``fit`` (one class; its loss is vmapped with ``tasks[0]`` as ``self``)."""
        self.tasks, self.selection_metric = tasks, tasks[0].selection_metric
        self._aux = hasattr(type(tasks[0]), "loss_and_aux")
        loss = type(tasks[0]).loss_and_aux if self._aux else type(tasks[0]).loss
        self._losses = vmap(lambda p, b, batch: loss(tasks[0], _Bound(self.base, p, b), batch))
        # grouped: the model's outputs for all runs at once (train.grouped), and the task's losses from them
        self._grouped_loss = self.grouped is not None and hasattr(type(tasks[0]), "grouped_loss_and_aux")

    def retire(self, r: int) -> None:
        """Run ``r`` takes no more steps in later ``fit`` calls (its sequence ended): its loss reads as NaN, so each
        fit stops it at its first step, as a diverged run."""
        self.retired.add(r)

    def set_lr(self, factor: float) -> list[float]:
        self.opt.lr = (self.base_lrs * factor).float()
        return (self.base_lrs * factor).tolist()

    def losses(self, step: int, batch_size: int):
        batch = _stack([t.train_batch(step, batch_size) for t in self.tasks])
        with autocast(self.device):
            if self._grouped_loss:
                task = self.tasks[0]
                loss = task.grouped_loss_and_aux(self.grouped(self.base, self.params, task.model_input(batch)), batch,
                                                 self.params)
            else:
                loss = self._losses(self.params, self.buffers, batch)
        if self._aux or self._grouped_loss:
            loss, aux = loss
            for task, value in zip(self.tasks, aux.detach().float().tolist()):
                task.take_aux(value)
        values = loss.detach().float().tolist()
        return loss, [math.nan if r in self.retired else v for r, v in enumerate(values)]

    def backward_clip(self, loss: torch.Tensor, values: list[float], clip: float) -> list[float]:
        ok = torch.tensor([v == v and abs(v) != float("inf") for v in values], device=self.device)
        for p in self.params.values():
            p.grad = None
        torch.where(ok, loss, torch.zeros_like(loss)).sum().backward()
        values_ok = ok.tolist()
        if all(values_ok) and self.opt.all_trainable():  # nothing to mask: one norm per run
            grads = [p.grad.flatten(1) for p in self.params.values() if p.grad is not None]
            total = torch.linalg.vector_norm(torch.cat(grads, 1), dim=1)
            return self._clipped(total, clip, values_ok)
        norms = []
        for name, p in self.params.items():
            if p.grad is not None:  # frozen in a run: no gradient there (a diverged run's NaN stays out too)
                keep = per_run(self.masks[name] & ok, p)
                p.grad = torch.where(keep, p.grad, torch.zeros_like(p.grad))
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
        return self.tasks[r].evaluate(self.models[r], split, autocast=lambda: autocast(self.device))

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
