"""One continual run: a model trained through a task sequence, one ``fit`` call per task.

The shared loop runs each task: the task object (``bench.ContinualTask``) supplies the batches, loss and
evaluation; the optimizer is built once and handed to every ``fit`` call (``optimizer=``), so Adam's moments
and step count carry across task boundaries as in a single long run. Per-task fit settings: constant lr
(no warmup, ``min_lr_factor`` 1), no gradient clipping, one evaluation at the task's last step (so restoring
the "best" weights at the end of fit is a no-op). After each task the whole sequence state (model, optimizer
moments, RNG, steps log, per-task rows, ReDo masks) goes to ``ckpt.safetensors``; a killed or preempted run resumes
at the next task, and a run stopped by a signal inside a task resumes at that step (fit's own checkpoint in
``fit/``). Either way it ends with the records of an uninterrupted run.

Fused (``continual.fuse: true``, a pack's runs of one ``fuse_key``: grid, benchmark, model): the runs' sequences
go through the tasks in step as one ``FusedRuns`` group (one batched model, one ``fit`` per task, the stacked
optimizer carried across tasks); each run keeps its own seed and data, optimizer of the Adam family with its decay
and λ, loss terms (coupled isometry, L2-init with its own θ₀: ``bench.group_regulariser``), boundary changes
(Shrink & Perturb, ReDo on its slice of the moments), measurements, checkpoints and records. A run whose sequence
ends early (diverged) is retired from the group. Optimizers without a stacked form train unfused. The group trains
on the job's device (``auto``: the GPU when the job has one; one tiny run alone stays on the CPU).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from adaptlab.config import config_hash, stable_json, train_config
from adaptlab.continual import bench, metrics
from adaptlab.continual.schema import RAW_SCHEMA, SUMMARY_FIELDS
from adaptlab.runner import Run, execute, execute_many
from adaptlab.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from adaptlab.train.fused import FUSED_OPTIMIZERS, FusedRuns, fused_config_id
from adaptlab.train.loop import BEST_NAME, CKPT_NAME, FitResult, fit
from adaptlab.train.optim import build_optimizer
from adaptlab.train.stacked import PER_RUN_KEYS


def fit_config(spec: dict) -> dict:
    g, m = spec["grid_cfg"], spec["method"]
    return train_config({
        "steps": g["steps"], "batch_size": g["batch_size"], "lr": m["lr"] or g["lr"], "optimizer": m["optimizer"],
        "weight_decay": m["weight_decay"], "isometry_lambda": m["isometry_lambda"],
        "isometry_scale": m["isometry_scale"], "warmup_steps": 0, "min_lr_factor": 1.0, "clip_grad": None,
        "eval_every": g["steps"], "ckpt_every": 0,
    }, {"fused_adam": True} if g.get("fused_adam") else None,
        {"precision": g["precision"]} if "precision" in g else None)


def measure(model, opt_cfg: dict, x_probe: torch.Tensor, x_ntk: torch.Tensor | None, taus) -> tuple[list, dict]:
    """[(layer, metric, value)] at the end of a task, and the dormant masks per layer (for ReDo)."""
    rows, masks = [], {}
    units = metrics.unit_activity(model, x_probe, taus)
    for layer, vals in units.items():
        for key, val in vals.items():
            if key.startswith("mask_"):
                masks.setdefault(key[5:], {})[layer] = val
            else:
                rows.append((layer, key, val))
    for key in ["dead"] + [f"dormant_{t:g}" for t in taus]:
        rows.append(("all", key, sum(v[key] for v in units.values()) / len(units)))
    from adaptlab.train.adamo import select_isometry

    chosen = select_isometry(model.named_parameters(), opt_cfg["isometry_patterns"], opt_cfg["isometry_exclude"])
    sv_all: dict[str, list[float]] = {}
    params = dict(model.named_parameters())
    for name, split in chosen.items():
        for k, block in enumerate(params[name].detach().chunk(split, 0)):
            layer = name if split == 1 else f"{name}[{k}]"
            for key, val in metrics.sv_stats(block, opt_cfg["isometry_scale"]).items():
                rows.append((layer, key, val))
                sv_all.setdefault(key, []).append(val)
    for key, vals in sv_all.items():
        rows.append(("all", key, sum(vals) / len(vals)))
    rows.append(("all", "weight_norm", torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())).item()))
    with torch.no_grad():
        feats = model.features(x_probe)
    rows += [("all", k, v) for k, v in metrics.feature_rank(feats).items()]
    if x_ntk is not None:
        rows.append(("all", "ntk_cond", metrics.entk_condition(model, x_ntk)))
    return rows, masks


class Sequence:
    """One run's task sequence around the shared loop: its model, method and data, its change at a task boundary,
    what it measures after each task's fit, and its records (in its ``Run``). ``run_continual`` drives one,
    ``run_continual_fused`` the sequences of a fused group in step."""

    def __init__(self, spec: dict, run: Run, data_path):
        g, method = spec["grid_cfg"], spec["method"]
        self.spec, self.run, self.g, self.method, self.cfg = spec, run, g, method, fit_config(spec)
        self.table_rows: list[dict] = []
        run.tables["continual_task_metrics"] = (self.table_rows, RAW_SCHEMA)
        self.accs, self.dead, self.masks, self.done = [], [], {}, False
        self.log = run.log = {"step": [], "loss": [], "lr": [], "grad_norm": []}
        run.status = "ok"
        run.extra.update(method=spec["method_name"], summary_tasks=g["summary_tasks"], n_tasks=0, acc_first=None,
                         acc_last=None, dead_frac_end=None)
        b = spec["benchmark"]
        self.side, n_true = bench.input_shape(b, data_path)
        self.classes = {"random": g["classes"], "pairs": 2, "permuted": n_true}[b["labels"]]
        self.in_dim = math.prod(bench.image_shape(self.side)) if self.side else b["dim"]
        torch.manual_seed(spec["seed"])
        run.model = self.model = bench.build_model(spec["model"], self.in_dim, self.side, self.classes)
        self.reg = bench.make_regulariser(method, self.model, self.cfg["isometry_patterns"], self.cfg["isometry_exclude"])
        self.fit_dir, self.ckpt, self.key = run.out_dir / "fit", run.out_dir / CKPT_NAME, config_hash(spec)
        self.tasks = bench.task_sequence(b, spec["seed"], g["tasks"], g["classes"], data_path)

    def resumed(self, meta: dict, log: dict) -> int:
        """Go on from a boundary checkpoint's (meta, log), its weights and moments already loaded; the next task."""
        self.accs, self.dead = meta["accs"], meta["dead"]
        self.masks = {tau: {layer: torch.tensor(m, dtype=torch.bool) for layer, m in by_layer.items()}
                      for tau, by_layer in meta["masks"].items()}
        self.table_rows += meta["rows"]
        self.log = self.run.log = log
        k = self.g["summary_tasks"]
        self.run.extra.update(n_tasks=len(self.accs), acc_first=sum(self.accs[:k]) / len(self.accs[:k]))
        return meta["next_task"]

    def changes_at(self, t: int) -> bool:
        return t > 0 and (self.method["shrink"] is not None or self.method["redo_tau"] is not None)

    def boundary(self, t: int, model, opt) -> None:
        """The method's change at the start of task ``t`` (Shrink & Perturb, ReDo), from a fresh init seeded by (seed, t)."""
        if not self.changes_at(t):
            return
        torch.manual_seed(self.spec["seed"] * 1_000 + t)
        fresh = bench.build_model(self.spec["model"], self.in_dim, self.side, self.classes)
        fresh.to(next(model.parameters()).device)
        if self.method["shrink"] is not None:
            bench.shrink_perturb(model, fresh, self.method["shrink"], self.method["perturb"])
        if self.method["redo_tau"] is not None:
            bench.redo_reset(model, fresh, opt, self.masks.get(f"{self.method['redo_tau']:g}", {}))

    def task(self, t: int, item, group_regulariser=None) -> bench.ContinualTask:
        """Task ``t`` of the sequence, its tensors on the run's device (a fused group's may be a GPU); a fused group's
        tasks carry the group's loss terms (``bench.group_regulariser``)."""
        x, y, perm, held_out = (None if v is None else v.to(self.run.device) if torch.is_tensor(v) else
                                tuple(u.to(self.run.device) for u in v) for v in item)
        return bench.ContinualTask(x, y, perm, self.spec["seed"], t, self.side, self.reg, test=held_out,
                                   group_regulariser=group_regulariser)

    def finish(self, t: int, task: bench.ContinualTask, last: FitResult, model) -> dict | None:
        """After task ``t``'s fit: merge its log, measure ``model``, add the task's rows. The boundary checkpoint's
        meta while the sequence goes on; None once it ended (all tasks done, or the task diverged)."""
        g, log, run, k = self.g, self.log, self.run, self.g["summary_tasks"]
        n_before, n_new = len(log["step"]), len(last.log["step"])
        for key in set(log) | set(last.log):  # val_* columns exist only in some logs: pad with NaN
            vals = last.log.get(key, [math.nan] * n_new)
            log.setdefault(key, [math.nan] * n_before).extend([v + t * g["steps"] for v in vals] if key == "step" else vals)
        # the loop's result of the whole sequence so far: its last task's metrics, the steps of all tasks
        wall = time.perf_counter() - run.started
        run.result = FitResult(status=last.status, steps_done=len(log["step"]), best_step=None, best_val=last.best_val,
                               test=last.test, final_loss=last.final_loss, log=log, elapsed_seconds=wall,
                               steps_this_process=len(log["step"]), seconds_this_process=wall)
        if last.status != "ok":
            run.status, self.done = last.status, True
            return None
        do_ntk = g["ntk_every"] and (t % g["ntk_every"] == 0 or t == g["tasks"] - 1)
        taus = (0.0, 0.025, 0.1) if self.method["redo_tau"] is None else \
            tuple(sorted({0.0, 0.025, 0.1, self.method["redo_tau"]}))
        rows, self.masks = measure(model, self.cfg, task.x[: g["probe"]], task.x[: g["ntk_probe"]] if do_ntk else None,
                                   taus)
        rows += [("all", "acc", last.best_val["acc"]), ("all", "loss", last.best_val["loss"]),
                 ("all", "online_acc", sum(task.online) / len(task.online))]
        if task.test is not None:  # pairs: accuracy on the pair's held-out images (Dohare et al.'s measure)
            rows.append(("all", "test_acc", last.test["acc"]))
        self.accs.append(last.best_val["acc"])
        self.dead.append(next(v for l, k_, v in rows if l == "all" and k_ == "dead"))
        s = self.spec
        self.table_rows += [{"run_id": s["run_id"], "grid": s["grid"], "benchmark": s["benchmark_name"],
                             "model": s["model_name"], "method": s["method_name"], "seed": s["seed"], "task": t,
                             "layer": layer, "metric": key, "value": float(val)} for layer, key, val in rows]
        self.done = len(self.accs) == g["tasks"]
        run.extra.update(n_tasks=len(self.accs), acc_first=sum(self.accs[:k]) / len(self.accs[:k]),
                         acc_last=sum(self.accs[-k:]) / len(self.accs[-k:]) if self.done else None,
                         dead_frac_end=self.dead[-1] if self.done else None)
        (self.fit_dir / CKPT_NAME).unlink(missing_ok=True)
        if self.done:
            return None
        return {"next_task": t + 1, "accs": self.accs, "dead": self.dead, "rows": self.table_rows,
                "masks": {tau: {layer: m.tolist() for layer, m in by_layer.items()} for tau, by_layer in self.masks.items()}}

    def clean(self) -> None:
        for name in (BEST_NAME, CKPT_NAME):
            (self.fit_dir / name).unlink(missing_ok=True)


def _identity(spec: dict) -> dict:
    cfg = fit_config(spec)
    return {"run_id": spec["run_id"], "kind": "continual", "study": "continual", "grid": spec["grid"],
            "backbone": spec["model_name"], "dataset": spec["benchmark_name"], "seed": spec["seed"],
            "lr": cfg["lr"], "optimizer": cfg["optimizer"], "trainable": "full"}


def _job(spec: dict, out_dir, on_error: str, data_path) -> dict:
    return {"identity": _identity(spec), "spec": spec, "out_dir": out_dir, "on_error": on_error,
            "steps_planned": spec["grid_cfg"]["steps"] * spec["grid_cfg"]["tasks"], "extra_fields": SUMMARY_FIELDS,
            "inputs": [data_path] if data_path else []}


def run_continual(spec: dict, out_dir: str | Path, *, threads: int = 1, on_error: str = "record",
                  data_path: str | Path | None = None) -> dict:
    """Train through the task sequence of ``spec`` (a run's params); write summary and task-metric Parquet.
    ``data_path``: the prepared dataset of a benchmark with ``inputs: dataset``."""

    def body(run: Run) -> None:
        seq = Sequence(spec, run, data_path)
        opt = build_optimizer(list(seq.model.named_parameters()), seq.cfg)
        first = 0
        if seq.ckpt.exists() and read_checkpoint_meta(seq.ckpt).get("config_id") == seq.key:
            first = seq.resumed(*load_checkpoint(seq.ckpt, seq.model, opt))
        for t, item in enumerate(seq.tasks):
            if t < first:
                continue  # done before the restart: the sequence is regenerated (seeded), not retrained
            seq.boundary(t, seq.model, opt)
            task = seq.task(t, item)
            last = fit(seq.model, task, seq.cfg, seq.fit_dir, device=run.device, config_id=config_hash([spec, t]),
                       optimizer=opt)
            meta = seq.finish(t, task, last, seq.model)
            if meta is None:
                break
            save_checkpoint(seq.ckpt, seq.model, opt, seq.log, {**meta, "config_id": seq.key})
        seq.clean()

    job = _job(spec, out_dir, on_error, data_path)
    # tiny models: the CPU is faster than a GPU launch per op; execute removes ckpt.safetensors once recorded
    return execute(job["identity"], spec, out_dir, body, steps_planned=job["steps_planned"], device="cpu",
                   threads=threads, on_error=on_error, extra_fields=SUMMARY_FIELDS, inputs=job["inputs"])


# what a run of a fused group holds apart: its training values that may differ in a group, and its change at a task
# boundary (the method keys of those training values have the same names)
PER_RUN_METHOD = PER_RUN_KEYS + ("shrink", "perturb", "redo_tau", "coupled_lambda", "l2_init")


def fuse_key(spec: dict) -> str | None:
    """Continual runs with equal keys train fused: the same grid, benchmark and model; the seed, lr, optimizer of
    the Adam family, its decay and λ, the method's loss terms (coupled isometry λ, L2-init λ: a group computes each
    run's own, ``bench.group_regulariser``) and its change at a task boundary (Shrink & Perturb, ReDo) are each
    run's own. SGD runs group apart."""
    optimizer = fit_config(spec)["optimizer"]
    if optimizer not in FUSED_OPTIMIZERS:
        return None
    shared = {k: v for k, v in spec.items() if k not in ("run_id", "seed", "method_name", "method")}
    method = {k: v for k, v in spec["method"].items() if k not in PER_RUN_METHOD}
    return stable_json({**shared, "method": method, "family": "sgd" if optimizer == "sgd" else "adam"})


def run_continual_fused(specs: list[dict], out_dirs: list, *, threads: int = 1, on_error: str = "record",
                        data_path: str | Path | None = None, device: str = "auto") -> list[dict]:
    """The sequences of several runs of one ``fuse_key`` in step, as one batched model per task (module docstring);
    each run's records are those ``run_continual`` writes, within float rounding."""
    jobs = [_job(s, out, on_error, data_path) for s, out in zip(specs, out_dirs)]
    index = {str(Path(out)): i for i, out in enumerate(out_dirs)}

    def body(todo: list[Run]) -> None:
        seqs = [Sequence(specs[index[str(r.out_dir)]], r, data_path) for r in todo]
        ids = [fused_config_id(s.key) for s in seqs]
        metas = [read_checkpoint_meta(s.ckpt) if s.ckpt.exists() else {} for s in seqs]
        # a group resumes together, from the task boundary all its runs reached, or starts again
        agreed = len({m.get("next_task") for m in metas}) == 1 and all(m.get("config_id") == i for m, i in zip(metas, ids))
        first, group, cfg = metas[0]["next_task"] if agreed else 0, None, seqs[0].cfg
        # the runs' own loss terms over the stacked weights, θ₀ (L2-init) from the models as built from their seeds
        terms = bench.group_regulariser([s.method for s in seqs], [s.model for s in seqs], cfg["isometry_patterns"],
                                        cfg["isometry_exclude"], todo[0].device)
        for t in range(seqs[0].g["tasks"]):
            items = [next(s.tasks) for s in seqs]  # every sequence is regenerated (seeded) up to the restart
            live = [r for r, s in enumerate(seqs) if not s.done]
            if t < first:
                continue
            if not live:
                break
            tasks = [s.task(t, item, terms) for s, item in zip(seqs, items)]
            if group is None:
                group = FusedRuns([s.model for s in seqs], tasks, [s.cfg["lr"] for s in seqs], cfg, todo[0].device,
                                  run_cfgs=[s.cfg for s in seqs])
                if group.grouped is None and terms is not None:  # the vmap path takes run 0's loss for every run
                    raise ValueError(f"continual model {seqs[0].spec['model_name']!r} has no grouped forward "
                                     f"(adaptlab.train.grouped): its runs with loss terms cannot train fused")
                for r, s in enumerate(seqs):
                    if first:
                        s.resumed(*group.load_checkpoint(r, s.ckpt))
            for r in live:
                if seqs[r].changes_at(t):
                    group.sync(r)
                    seqs[r].boundary(t, group.models[r], group.optimizer_view(r))
                    group.push(r)
            group.set_tasks(tasks)
            results = fit(group, None, cfg, [s.fit_dir for s in seqs], device=todo[0].device,
                          config_id=[fused_config_id(config_hash([s.spec, t])) for s in seqs])
            for r in live:
                meta = seqs[r].finish(t, tasks[r], results[r], group.models[r])
                if meta is None:
                    group.retire(r)
                else:
                    group.save_checkpoint(r, seqs[r].ckpt, seqs[r].log, {**meta, "config_id": ids[r]})
        for s in seqs:
            s.clean()

    return execute_many(jobs, body, device=device, threads=threads)


def _continual_job(spec, i, p, out, threads):
    return run_continual(spec, out, threads=threads, on_error=p["on_error"], data_path=i.get("data"))


def _continual_fused_job(specs, inputs, params, outs, threads):
    return run_continual_fused(specs, outs, threads=threads, on_error=params[0]["on_error"],
                               data_path=inputs[0].get("data"))


# rule -> the job: (spec, named inputs, params, run directory, threads); workflow/scripts/study_run.py calls it
RULES = {"continual_run": _continual_job}
# rule -> (fuse key of a spec, the fused job: (specs, inputs, params, run directories, threads)); adaptlab.packs
FUSED = {"continual_run": (fuse_key, _continual_fused_job)}
