"""The optimizers of a fused group (``train.fused.FusedRuns``): torch's SGD (momentum, dampening 0) and
Adam/AdamW, and ``adaptlab.train.adamo.AdamO`` (Adam + the decoupled isometry step, one batched Gram per
regularised matrix), over tensors stacked along a leading run dimension.

Per run: the lr (a tensor of shape [R]), the update mask (the run trains that tensor and is still active), and,
in the Adam family, the optimizer itself: a group may mix Adam (weight decay added to the gradient), AdamW
(decoupled decay) and AdamO (no decay but the isometry step, its own λ), each run's update the one-run formula
of its optimizer. SGD runs group only with SGD runs. The updates follow the one-run formulas, so a fused run
matches its one-by-one twin within float tolerance (tests/test_fused.py).

Written by hand: torch.optim has no per-slice lr, mask or optimizer, and neither torch.func nor a well-kept
library trains a batch of models with per-model optimizer state (HFTA, Wang et al. MLSys 2021, rewrites layers
instead).
"""
from __future__ import annotations

import torch

FUSED_OPTIMIZERS = ("sgd", "adam", "adamw", "adamo")
ADAM_FAMILY = ("adam", "adamw", "adamo")
# the training values a run of a fused group may hold apart from the group's (every other value is shared)
PER_RUN_KEYS = ("lr", "optimizer", "weight_decay", "isometry_lambda")


def per_run(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-run vector (runs,) shaped to broadcast over a stacked tensor (runs, ...)."""
    return vec.view(-1, *([1] * (like.dim() - 1)))


def check_run_configs(cfg: dict, run_cfgs: list[dict]) -> None:
    """Every run's training values equal the group's ``cfg`` except ``PER_RUN_KEYS``; optimizers that can share a
    stacked update (all SGD, or all of the Adam family)."""
    for r, c in enumerate(run_cfgs):
        if c["optimizer"] not in FUSED_OPTIMIZERS:
            raise ValueError(f"fused run {r}: optimizer {c['optimizer']!r} cannot train fused (fused: {FUSED_OPTIMIZERS})")
        bad = sorted(k for k in cfg.keys() | c.keys() if k not in PER_RUN_KEYS and c.get(k) != cfg.get(k))
        if bad:
            raise ValueError(f"fused run {r}: {bad[0]!r} is {c.get(bad[0])!r}, the group's is {cfg.get(bad[0])!r}; "
                             f"runs of one group differ only in {', '.join(PER_RUN_KEYS)}")
    kinds = {c["optimizer"] for c in run_cfgs}
    if len(kinds) > 1 and not kinds <= set(ADAM_FAMILY):
        raise ValueError(f"fused runs mix the optimizers {sorted(kinds)}: only {', '.join(ADAM_FAMILY)} share a stacked "
                         f"update")


def isometry_matrices(models: list[torch.nn.Module], run_cfgs: list[dict]) -> dict[str, int]:
    """AdamO: {name: split} of the matrices its isometry step regularises in any AdamO run, each run's trainable
    tensors selected (and checked) exactly as ``optim.build_optimizer`` selects them for the run alone."""
    from adaptlab.train.adamo import _check_lambda, select_isometry

    chosen: dict[str, int] = {}
    for m, c in zip(models, run_cfgs):
        if c["optimizer"] == "adamo":
            _check_lambda(c["isometry_lambda"], "fused AdamO")
            trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            chosen.update(select_isometry(trainable, c["isometry_patterns"], c["isometry_exclude"]))
    return chosen


class StackedOptimizer:
    """SGD-momentum or the Adam family over stacked tensors: per-run lr (``lrs``: a tensor of shape [R]) and
    optimizer (``run_cfgs``, default: every run ``cfg``'s), and updates masked per run and tensor (trainable in
    that run and the run still active)."""

    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], lrs: torch.Tensor, cfg: dict,
                 isometry: dict[str, int] | None = None, run_cfgs: list[dict] | None = None):
        self.params, self.masks, self.cfg, self.lr = params, masks, cfg, lrs.clone()
        runs = run_cfgs or [cfg] * len(lrs)
        check_run_configs(cfg, runs)
        kinds = [c["optimizer"] for c in runs]
        self.sgd = kinds[0] == "sgd"

        def vec(values):
            return torch.tensor(values, dtype=lrs.dtype, device=lrs.device)

        wd = [float(c["weight_decay"] or 0.0) for c in runs]
        # Adam and SGD add the decay to the gradient, AdamW decays the weights, AdamO's only decay is its isometry step
        self.l2 = vec([w if k in ("sgd", "adam") else 0.0 for k, w in zip(kinds, wd)])
        self.decoupled = vec([w if k == "adamw" else 0.0 for k, w in zip(kinds, wd)])
        self.iso_lambda = vec([float(c["isometry_lambda"] or 0.0) if k == "adamo" else 0.0 for k, c in zip(kinds, runs)])
        self._any = {"l2": bool(self.l2.any()), "decoupled": bool(self.decoupled.any()),
                     "iso": bool(self.iso_lambda.any())}
        # the runs that take an isometry step (None: all of them): ∇R costs a Gram and two matmuls per matrix,
        # more than a small MLP's forward and backward, so the other runs of a mixed group skip it
        iso_runs = self.iso_lambda.nonzero().flatten()
        self._iso_runs = None if len(iso_runs) == len(runs) else iso_runs
        # one optimizer and decay for all runs: the kernel applies the decay itself, as for a run alone
        self._one = (kinds[0], wd[0]) if len(set(kinds)) == 1 and len(set(wd)) == 1 else None
        self.isometry = isometry or {}  # AdamO: {name: row-block split} of the regularised matrices
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.t = 0
        self._warned = False
        self._all_trainable: bool | None = None

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        cfg, self.t = self.cfg, self.t + 1
        if not self.sgd and self._uniform(active):
            return self._fused_step()
        # AdamO: ∇R at θ_t, before the Adam update, never in the moments (adamo.AdamO.step)
        isos = self._isometry_steps([n for n, p in self.params.items() if p.grad is not None])
        for name, p in self.params.items():
            if p.grad is None:
                continue
            keep = per_run(self.masks[name] & active, p)
            lr, g = per_run(self.lr, p), p.grad
            st = self.state.setdefault(name, {})
            iso = isos.get(name)
            if iso is not None and iso[0] is not None:  # the step of the AdamO runs only: 0 for the others
                iso = (None, torch.zeros_like(p).index_copy_(0, *iso))
            if self._any["l2"]:
                g = g + per_run(self.l2, p) * p
            if self.sgd:
                if cfg["momentum"]:
                    buf = st.get("momentum_buffer")
                    buf = g.clone() if buf is None else torch.where(keep, buf * cfg["momentum"] + g, buf)
                    st["momentum_buffer"] = buf
                    g = g + cfg["momentum"] * buf if cfg["nesterov"] else buf
                new = p - lr * g
            else:
                b1, b2 = cfg["betas"]
                new = p * (1 - lr * per_run(self.decoupled, p)) if self._any["decoupled"] else p
                m, v = self._moments(name, p)
                st["exp_avg"] = torch.where(keep, m.lerp(g, 1 - b1), m)
                st["exp_avg_sq"] = torch.where(keep, torch.addcmul(v * b2, g, g, value=1 - b2), v)
                bc1, bc2 = 1 - b1 ** self.t, (1 - b2 ** self.t) ** 0.5
                denom = st["exp_avg_sq"].sqrt() / bc2 + cfg["eps"]
                new = new - (lr / bc1) * st["exp_avg"] / denom
                if iso is not None:
                    new = new - iso[1]
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
        """The Adam family on the stacked tensors in torch's fused kernel (one call; the same per-element formula as
        the masked update, an elementwise update being the same on a stack as on each run's slice). Runs with
        different optimizers: each run's decay applied first (to its gradient or its weights, as the kernel would),
        then the kernel without decay."""
        cfg, lr = self.cfg, self.lr[0].item()
        names = [n for n, p in self.params.items() if p.grad is not None]
        params = [self.params[n] for n in names]
        iso = self._isometry_steps(names)  # AdamO: ∇R at θ_t, before the Adam update
        for n, p in zip(names, params):
            self._moments(n, p)
        if self._one is not None:
            kind, wd = self._one
            kernel = torch._fused_adamw_ if kind == "adamw" else torch._fused_adam_
            wd = 0.0 if kind == "adamo" else wd
        else:
            kernel, wd = torch._fused_adam_, 0.0
            # one foreach call per decay, not an op per tensor: a small model's step is mostly per-op cost
            if self._any["l2"]:
                grads = [p.grad for p in params]
                torch._foreach_add_(grads, torch._foreach_mul(params, [per_run(self.l2, p) for p in params]))
            if self._any["decoupled"]:
                decay = 1 - lr * self.decoupled
                torch._foreach_mul_(params, [per_run(decay, p) for p in params])
        step = torch.tensor(float(self.t), device=params[0].device)
        b1, b2 = cfg["betas"]
        kernel(params, [p.grad for p in params], [self.state[n]["exp_avg"] for n in names],
               [self.state[n]["exp_avg_sq"] for n in names], [], [step] * len(params), lr=lr, beta1=b1, beta2=b2,
               weight_decay=wd, eps=cfg["eps"], amsgrad=False, maximize=False)
        for n, (idx, d) in iso.items():
            if idx is None:
                self.params[n].sub_(d)
            else:  # only the AdamO runs' slices move (no dense zeros for the others)
                self.params[n].index_add_(0, idx, d, alpha=-1)

    def _moments(self, name: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's (exp_avg, exp_avg_sq) of tensor ``name``, zeros the first time (allocated once, not per step)."""
        st = self.state.setdefault(name, {})
        if "exp_avg" not in st:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        return st["exp_avg"], st["exp_avg_sq"]

    def _isometry_steps(self, names: list[str]) -> dict[str, tuple]:
        """{name: (run indices, η_iso·λ·∇R(W) of those runs' slices)} of the AdamO matrices among ``names``:
        η_iso = ``isometry_lr_scale`` × the run's current lr. The indices are the AdamO runs of a group that mixes
        optimizers, None when every run is AdamO's (the step then covers all runs); empty when no run is. The
        matrices' Grams go batched by shape (``adamo.isometry_grads``)."""
        from adaptlab.train.adamo import isometry_grads, sigma_max_sq_bound, stability_check_due, warn_unstable

        names = [n for n in names if n in self.isometry]
        if not self._any["iso"] or not names:
            return {}
        scale, idx = self.cfg["isometry_scale"], self._iso_runs
        ws = [self.params[n] if idx is None else self.params[n].index_select(0, idx) for n in names]
        lam, lr = (self.iso_lambda, self.lr) if idx is None else (self.iso_lambda[idx], self.lr.index_select(0, idx))
        coeff = self.cfg["isometry_lr_scale"] * lam * lr
        if not self._warned and stability_check_due(self.t):
            for w in ws:
                self._warned = self._warned or warn_unstable(coeff.max().item(), sigma_max_sq_bound(w, batch_dims=1),
                                                             scale)
        grads = isometry_grads(ws, scale, [self.isometry[n] for n in names], batch_dims=1)
        return {n: (idx, per_run(coeff, g) * g.to(self.params[n].dtype)) for n, g in zip(names, grads)}

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
