"""One continual run: a model trained through a task sequence, one ``fit`` call per task.

The shared loop runs each task: the task object (``bench.ContinualTask``) supplies the batches, loss and
evaluation; the optimizer is built once and handed to every ``fit`` call (``optimizer=``), so Adam's moments
and step count carry across task boundaries as in a single long run. Per-task fit settings: constant lr
(no warmup, ``min_lr_factor`` 1), no gradient clipping, one evaluation at the task's last step (so restoring
the "best" weights at the end of fit is a no-op). After each task the whole sequence state (model, optimizer
moments, RNG, steps log, per-task rows, ReDo masks) goes to ``ckpt.safetensors``; a killed or preempted run resumes
at the next task, and a run stopped by a signal inside a task resumes at that step (fit's own checkpoint in
``fit/``). Either way it ends with the records of an uninterrupted run.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from adaptlab.config import config_hash, train_config
from adaptlab.continual import bench, metrics
from adaptlab.continual.schema import RAW_SCHEMA, SUMMARY_FIELDS
from adaptlab.runner import Run, execute
from adaptlab.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from adaptlab.train.loop import BEST_NAME, CKPT_NAME, FitResult, fit
from adaptlab.train.optim import build_optimizer


def fit_config(spec: dict) -> dict:
    g, m = spec["grid_cfg"], spec["method"]
    return train_config({
        "steps": g["steps"], "batch_size": g["batch_size"], "lr": m["lr"] or g["lr"], "optimizer": m["optimizer"],
        "weight_decay": m["weight_decay"], "isometry_lambda": m["isometry_lambda"],
        "isometry_scale": m["isometry_scale"], "warmup_steps": 0, "min_lr_factor": 1.0, "clip_grad": None,
        "eval_every": g["steps"], "ckpt_every": 0,
    })


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


def run_continual(spec: dict, out_dir: str | Path, *, threads: int = 1, on_error: str = "record",
                  data_path: str | Path | None = None) -> dict:
    """Train through the task sequence of ``spec`` (a run's params); write summary and task-metric Parquet.
    ``data_path``: the prepared dataset of a benchmark with ``inputs: dataset``."""
    g, method = spec["grid_cfg"], spec["method"]
    cfg = fit_config(spec)
    identity = {"run_id": spec["run_id"], "kind": "continual", "study": "continual", "grid": spec["grid"],
                "backbone": spec["model_name"], "dataset": spec["benchmark_name"], "seed": spec["seed"],
                "lr": cfg["lr"], "optimizer": cfg["optimizer"], "trainable": "full"}
    k = g["summary_tasks"]

    def body(run: Run) -> None:
        taus = (0.0, 0.025, 0.1)
        table_rows: list[dict] = []
        run.tables["continual_task_metrics"] = (table_rows, RAW_SCHEMA)
        accs, dead, log = [], [], {"step": [], "loss": [], "lr": [], "grad_norm": []}
        run.log, run.status = log, "ok"
        run.extra.update(method=spec["method_name"], summary_tasks=k, n_tasks=0, acc_first=None, acc_last=None,
                         dead_frac_end=None)
        seed = spec["seed"]
        b = spec["benchmark"]
        side, n_true = bench.input_shape(b, data_path)
        classes = {"random": g["classes"], "pairs": 2, "permuted": n_true}[b["labels"]]
        in_dim = math.prod(bench.image_shape(side)) if side else b["dim"]
        torch.manual_seed(seed)
        run.model = model = bench.build_model(spec["model"], in_dim, side, classes)
        opt = build_optimizer(list(model.named_parameters()), cfg)
        reg = bench.make_regulariser(method, model, cfg["isometry_patterns"], cfg["isometry_exclude"])
        fit_dir = run.out_dir / "fit"
        masks, last = {}, None
        ckpt, run_key = run.out_dir / CKPT_NAME, config_hash(spec)
        resume = _load_boundary(ckpt, run_key, model, opt)
        if resume is not None:
            first, accs, dead, masks, rows_so_far, log = resume
            table_rows += rows_so_far
            run.log = log
            run.extra.update(n_tasks=len(accs), acc_first=sum(accs[:k]) / len(accs[:k]))
        tasks = bench.task_sequence(b, seed, g["tasks"], g["classes"], data_path)
        for t, (x, y, perm, held_out) in enumerate(tasks):
            if resume is not None and t < first:
                continue  # done before the restart: the sequence is regenerated (seeded), not retrained
            if t > 0 and (method["shrink"] is not None or method["redo_tau"] is not None):
                torch.manual_seed(seed * 1_000 + t)
                fresh = bench.build_model(spec["model"], in_dim, side, classes)
                if method["shrink"] is not None:
                    bench.shrink_perturb(model, fresh, method["shrink"], method["perturb"])
                if method["redo_tau"] is not None:
                    bench.redo_reset(model, fresh, opt, masks.get(f"{method['redo_tau']:g}", {}))
            task = bench.ContinualTask(x, y, perm, seed, t, side, reg, test=held_out)
            last = fit(model, task, cfg, fit_dir, device=run.device, config_id=config_hash([spec, t]), optimizer=opt)
            n_before, n_new = len(log["step"]), len(last.log["step"])
            for key in set(log) | set(last.log):  # val_* columns exist only in some logs: pad with NaN
                vals = last.log.get(key, [math.nan] * n_new)
                log.setdefault(key, [math.nan] * n_before).extend(
                    [v + t * g["steps"] for v in vals] if key == "step" else vals)
            # the loop's result of the whole sequence so far: its last task's metrics, the steps of all tasks
            wall = time.perf_counter() - run.started
            run.result = FitResult(status=last.status, steps_done=len(log["step"]), best_step=None,
                                   best_val=last.best_val, test=last.test, final_loss=last.final_loss, log=log,
                                   elapsed_seconds=wall, steps_this_process=len(log["step"]), seconds_this_process=wall)
            if last.status != "ok":
                run.status = last.status
                break
            probe = task.x[: g["probe"]]
            do_ntk = g["ntk_every"] and (t % g["ntk_every"] == 0 or t == g["tasks"] - 1)
            taus_run = taus if method["redo_tau"] is None else tuple(sorted(set(taus) | {method["redo_tau"]}))
            rows, masks = measure(model, cfg, probe, task.x[: g["ntk_probe"]] if do_ntk else None, taus_run)
            rows += [("all", "acc", last.best_val["acc"]), ("all", "loss", last.best_val["loss"]),
                     ("all", "online_acc", sum(task.online) / len(task.online))]
            if held_out is not None:  # pairs: accuracy on the pair's held-out images (Dohare et al.'s measure)
                rows.append(("all", "test_acc", last.test["acc"]))
            accs.append(last.best_val["acc"])
            dead.append(next(v for l, k_, v in rows if l == "all" and k_ == "dead"))
            table_rows += [{"run_id": spec["run_id"], "grid": spec["grid"], "benchmark": spec["benchmark_name"],
                            "model": spec["model_name"], "method": spec["method_name"], "seed": seed, "task": t,
                            "layer": layer, "metric": key, "value": float(val)} for layer, key, val in rows]
            done = len(accs) == g["tasks"]
            run.extra.update(n_tasks=len(accs), acc_first=sum(accs[:k]) / len(accs[:k]),
                             acc_last=sum(accs[-k:]) / len(accs[-k:]) if done else None,
                             dead_frac_end=dead[-1] if done else None)
            (fit_dir / CKPT_NAME).unlink(missing_ok=True)
            if not done:
                _save_boundary(ckpt, run_key, t + 1, model, opt, log, accs, dead, masks, table_rows)
        (fit_dir / BEST_NAME).unlink(missing_ok=True)

    # tiny models: the CPU is faster than a GPU launch per op; execute removes ckpt.safetensors once recorded
    return execute(identity, spec, out_dir, body, steps_planned=g["steps"] * g["tasks"], device="cpu",
                   threads=threads, on_error=on_error, extra_fields=SUMMARY_FIELDS,
                   inputs=[data_path] if data_path else [])


def _save_boundary(path: Path, run_key: str, next_task: int, model, opt, log, accs, dead, masks, rows) -> None:
    meta = {"config_id": run_key, "next_task": next_task, "accs": accs, "dead": dead, "rows": rows,
            "masks": {tau: {layer: m.tolist() for layer, m in by_layer.items()} for tau, by_layer in masks.items()}}
    save_checkpoint(path, model, opt, log, meta)


def _load_boundary(path: Path, run_key: str, model, opt):
    """(next task, accs, dead, masks, task rows, steps log) of this run's last finished task, or None."""
    if not path.exists() or read_checkpoint_meta(path).get("config_id") != run_key:
        return None
    meta, log = load_checkpoint(path, model, opt)
    masks = {tau: {layer: torch.tensor(m, dtype=torch.bool) for layer, m in by_layer.items()}
             for tau, by_layer in meta["masks"].items()}
    return meta["next_task"], meta["accs"], meta["dead"], masks, meta["rows"], log


# rule -> the job: (spec, named inputs, params, run directory, threads); workflow/scripts/study_run.py calls it
RULES = {"continual_run": lambda spec, i, p, out, threads: run_continual(spec, out, threads=threads,
                                                                         on_error=p["on_error"], data_path=i.get("data"))}
