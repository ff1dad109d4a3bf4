"""The run skeleton every kind of run goes through, and the core runs (pretraining, finetuning grids).

``execute`` is the one skeleton: threads, run directory, device and clock; the run's ``body`` (build, ``fit``,
add its metrics); ``on_error`` (``record``: a failed run is written with status ``failed`` and its error, so
the grid goes on; ``raise``); ``records.write_run``; checkpoint clean-up. Each study's ``<study>/run.py``
supplies only the body, so its run function reads like nanoGPT: build, fit, add its metrics.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

import torch
from safetensors.torch import load_file

import adaptlab
from adaptlab import preemption, records, run_dir
from adaptlab.config import config_hash, pretrain_run_id, stable_json
from adaptlab.data.store import load_dataset
from adaptlab.fingerprint import code_fingerprint
from adaptlab.train.device import resolve_device, set_cpu_math
from adaptlab.train.fused import FUSED_OPTIMIZERS, FusedRuns, fused_config_id
from adaptlab.train.loop import BEST_NAME, CKPT_NAME, FitResult, fit
from adaptlab.train.tasks import ImageClassification
from adaptlab.train.trainable import count_parameters, select_trainable

MODEL_NAME = "model.safetensors"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else records.cpu_name()


def error_text(err: BaseException) -> str:
    """What a failed run records in its summary's ``error``: the exception and the last frames of its traceback."""
    return f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"


def summary_row(identity: dict, cfg: dict, model: torch.nn.Module | None, result: FitResult | None,
                 device: torch.device, full_config: dict, wall: float, status: str | None = None,
                 error: str | None = None) -> dict:
    """The core summary columns (``adaptlab.records.SUMMARY_FIELDS``) of a run; ``identity`` gives run_id, kind,
    study, grid, backbone, dataset, seed, lr, optimizer, trainable. Studies add their ``SUMMARY_FIELDS`` to it."""
    trainable, total = count_parameters(model) if model is not None else (None, None)
    best = result.best_val if result else {}
    test = (result.test or {}) if result else {}
    return {
        **identity,
        "status": status or (result.status if result else "failed"),
        "error": error,
        "best_val_acc": best.get("acc"),
        "best_val_loss": best.get("loss"),
        "best_step": result.best_step if result else None,
        "test_acc": test.get("acc"),
        "test_loss": test.get("loss"),
        "final_loss": result.final_loss if result else None,
        "steps_done": result.steps_done if result else 0,
        "steps_planned": cfg["steps"],
        "resumed_from": result.resumed_from if result else 0,
        "trainable_params": trainable,
        "total_params": total,
        "wall_seconds": wall,
        "steps_per_s": result.steps_per_second if result else None,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "device": str(device),
        "adaptlab_version": adaptlab.__version__,
        "torch_version": torch.__version__,
        **records.provenance(identity["kind"], identity.get("study"), device_name(device)),
        "config_json": stable_json(full_config),
    }


def _task(data, model, model_cfg: dict, cfg: dict, device, seed: int) -> ImageClassification:
    img_size = model.patch_embed.img_size[0]  # what the backbone takes, whether sized in config or by timm name
    return ImageClassification(data, img_size, device, seed, mean=model_cfg["mean"], std=model_cfg["std"],
                               eval_batch_size=cfg["eval_batch_size"], hflip=cfg["hflip"])


def start_run(out_dir: str | Path, threads: int, device: str = "auto") -> tuple[Path, torch.device, float]:
    """The opening every run shares: its CPU thread count, its directory (created), its device and its start time
    for ``wall_seconds``."""
    set_cpu_math(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, resolve_device(device), time.perf_counter()


@dataclass
class Run:
    """What a run's body fills in; ``execute`` turns it into the run's records.

    ``model``/``result``: counted and read for the core summary columns (``summary_row``); ``extra``: the study's
    summary columns (set the known ones first: a failed run keeps what was set before the error); ``log``: the
    steps log when it is not ``result.log``; ``tables``: raw tables, name -> (rows, schema), written as
    ``<name>.parquet`` whether the run ends ok or failed (rows may grow while the body runs); ``after``: what must
    happen once the records are written, on either path (e.g. a rule's weights output)."""

    out_dir: Path
    device: torch.device
    steps_planned: int
    started: float  # time.perf_counter() at the start of the run (``wall_seconds`` counts from it)
    model: torch.nn.Module | None = None
    result: FitResult | None = None
    status: str | None = None
    extra: dict = field(default_factory=dict)
    log: dict | None = None
    tables: dict[str, tuple[list[dict], pa.Schema]] = field(default_factory=dict)
    after: list[Callable[[], None]] = field(default_factory=list)


def execute(identity: dict, spec, out_dir: str | Path, body: Callable[[Run], None], *, steps_planned: int,
            device: str = "auto", threads: int = 1, on_error: str = "record", extra_fields=(),
            keep_best: bool = False, reraise: bool = False, inputs=()) -> dict:
    """Run ``body`` as one run and write its records (``summary.parquet``, ``steps.parquet``, raw tables).

    ``identity``: run_id, kind, study, grid, backbone, dataset, seed, lr, optimizer, trainable. ``spec``: what
    the run used, recorded as ``config_json``. ``inputs``: the files the run reads (weights, datasets); with the
    config and the code they key the kept records (``adaptlab.run_dir``: a retry after a failed group job restores
    a finished run instead of training it again). One process at a time trains a run directory (a lock; a second
    one waits). An exception in ``body`` re-raises with ``on_error='raise'``; otherwise the run is recorded
    ``failed`` with its error (and, with ``reraise``, raised after that: for runs whose outputs others need). A
    stop signal (``preemption.Preempted``) writes no records: the checkpoint stays and a retry resumes. The
    checkpoint is removed once the run is recorded (kept for a failed one, so a retry resumes); the best-val
    weights too unless ``keep_best``.
    """
    job = {"identity": identity, "spec": spec, "out_dir": out_dir, "steps_planned": steps_planned,
           "on_error": on_error, "extra_fields": extra_fields, "keep_best": keep_best, "reraise": reraise,
           "inputs": inputs}
    return execute_many([job], lambda runs: body(runs[0]), device=device, threads=threads)[0]


def execute_many(jobs: list[dict], body: Callable[[list[Run]], None], *, device: str = "auto",
                 threads: int = 1) -> list[dict]:
    """``execute`` for runs that train together (a fused pack; ``execute`` is this with one run). ``jobs`` are
    ``execute``'s keyword arguments per run (identity, spec, out_dir, steps_planned, on_error, extra_fields,
    keep_best, reraise, inputs). Each run's lock is held; runs whose kept records match are restored; ``body``
    gets the ``Run`` of every other run and fills each one's model and result; then each run's records are
    written. An exception in ``body`` is each run's error. Returns the summary rows, in ``jobs`` order."""
    started = [start_run(j["out_dir"], threads, device) for j in jobs]
    keys = [run_dir.record_key(stable_json(j["spec"]), code_fingerprint(j["identity"]["kind"], j["identity"].get("study")),
                               j.get("inputs", ())) for j in jobs]
    rows: list[dict | None] = [None] * len(jobs)
    with contextlib.ExitStack() as stack:
        for out_dir, _, _ in started:
            stack.enter_context(run_dir.exclusive(out_dir))
        stack.enter_context(preemption.watch())
        todo = []
        for i, (out_dir, _, _) in enumerate(started):
            if run_dir.restore(out_dir, keys[i]) is not None:
                rows[i] = records.read_summary(out_dir / "summary.parquet")
            else:
                todo.append(i)
                stack.callback(_mark_running(out_dir).unlink, missing_ok=True)
        runs = {i: Run(started[i][0], started[i][1], jobs[i]["steps_planned"], started[i][2]) for i in todo}
        failure, error = None, None
        try:
            if todo:
                body([runs[i] for i in todo])
        except preemption.Preempted:
            raise  # not a failure: no records, the checkpoint stays, the retried job resumes
        except Exception as err:  # noqa: BLE001 - recorded, the grid goes on
            if any(jobs[i].get("on_error", "record") == "raise" for i in todo):
                raise
            failure, error = err, error_text(err)  # here, where the traceback still ends at the failing line
        for i in todo:
            rows[i] = _record(runs[i], jobs[i], failure, error)
            if rows[i]["status"] in ("ok", "diverged"):
                run_dir.keep(runs[i].out_dir, keys[i])
        if failure is not None and any(jobs[i].get("reraise", False) for i in todo):
            raise failure  # recorded failed, and raised: runs whose outputs others need
    return rows


def _mark_running(out_dir: Path) -> Path:
    """``running.json``: which process trains this run (``adaptlab.run_state`` reports it as ``running``)."""
    marker = out_dir / records.RUNNING_NAME
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()}))
    return marker


def _record(run: Run, job: dict, failure: BaseException | None, error: str | None) -> dict:
    """Write one run's records (summary, steps, raw tables), run its ``after`` steps and clean its checkpoint."""
    if failure is not None:
        run.status, run.result = "failed", None
    row = summary_row(job["identity"], {"steps": run.steps_planned}, run.model, run.result, run.device, job["spec"],
                      time.perf_counter() - run.started, status=run.status, error=error)
    row.update(run.extra)
    for name, (rows, schema) in run.tables.items():
        records.write_table(pa.Table.from_pylist(rows, schema=schema), run.out_dir / f"{name}.parquet")
    log = run.log if run.log is not None else (run.result.log if run.result and not failure else None)
    records.write_run(run.out_dir, row, log, extra_fields=list(job.get("extra_fields", ())))
    for step in run.after:
        step()
    if failure is None:
        _cleanup(run.out_dir, job.get("keep_best", False))
    return row


def _cleanup(out_dir: Path, keep_best: bool) -> None:
    (out_dir / CKPT_NAME).unlink(missing_ok=True)
    if not keep_best:
        (out_dir / BEST_NAME).unlink(missing_ok=True)


def run_pretrain(spec: dict, data_path: str | Path, out_dir: str | Path, *, device: str = "auto", threads: int = 1,
                 on_step=None) -> dict:
    """Train the backbone from scratch on the source dataset, or load local timm weights (``init: file``).

    Writes ``model.safetensors`` (the best-val weights), ``summary.parquet`` and ``steps.parquet``. Every
    finetuning run needs the weights, so a failure raises.
    """
    identity = {"run_id": pretrain_run_id(spec["backbone"]), "kind": "pretrain", "study": "pretrain",
                "grid": "pretrain", "backbone": spec["backbone"], "dataset": spec["dataset"],
                "seed": spec["seed"], "lr": spec["train"]["lr"], "optimizer": spec["train"]["optimizer"],
                "trainable": "full"}
    cfg = spec["train"]

    from adaptlab.models.vit import create_vit, load_pretrained_weights, save_model_weights

    def body(run: Run) -> None:
        torch.manual_seed(spec["seed"])
        if spec["init"] == "file":
            run.model = create_vit(spec["model"], num_classes=0)  # headless: every finetuning run adds its own head
            load_pretrained_weights(run.model, spec["weights"])
            save_model_weights(run.model, run.out_dir / MODEL_NAME)
            run.steps_planned, run.status = 0, "ok"
            return
        data = load_dataset(data_path)
        run.model = create_vit(spec["model"], data.num_classes)
        task = _task(data, run.model, spec["model"], cfg, run.device, spec["seed"])
        run.result = fit(run.model, task, cfg, run.out_dir, device=run.device, config_id=config_hash(spec),
                         on_step=on_step)
        if run.result.best_step is not None:
            run.model.load_state_dict(load_file(str(run.out_dir / BEST_NAME)), strict=False)
        save_model_weights(run.model, run.out_dir / MODEL_NAME, metadata={"best_step": str(run.result.best_step)})

    return execute(identity, spec, out_dir, body, steps_planned=cfg["steps"], device=device, threads=threads,
                   on_error="raise", inputs=[p for p in (data_path, spec.get("weights")) if p])


def _finetune_identity(run: dict) -> dict:
    identity = {k: run[k] for k in ("run_id", "study", "grid", "backbone", "dataset", "seed", "lr", "optimizer",
                                    "trainable")}
    identity["kind"] = "finetune"
    return identity


def build_finetune(run: dict, model_cfg: dict, pretrained_path, data, device) -> tuple[torch.nn.Module, ImageClassification]:
    """A finetuning run's model (the backbone, a new head seeded by the run's seed, its trainable set) and task."""
    from adaptlab.models.vit import create_vit, load_model_weights

    torch.manual_seed(run["seed"])  # the new head's init depends on the run's seed
    model = create_vit(model_cfg, data.num_classes)
    load_model_weights(model, pretrained_path, skip_head=True)
    select_trainable(model, run["trainable_patterns"], head=True)
    return model, _task(data, model, model_cfg, run["train"], device, run["seed"])


def run_finetune(run: dict, model_cfg: dict, pretrained_path: str | Path, data_path: str | Path,
                 out_dir: str | Path, *, device: str = "auto", threads: int = 1, on_error: str = "record",
                 on_step=None) -> dict:
    """Finetune the pretrained backbone on one dataset with one grid point (``run`` = RunSpec.as_dict()).

    A new head (seeded by the run's seed) always trains; the ``trainable_patterns`` select the rest. A non-finite
    loss ends the run as ``diverged``; with ``on_error='record'`` an exception ends it as ``failed``. Either way
    the summary is written, so the grid and its aggregation go on.
    """
    cfg = run["train"]
    full_config = {"run": run, "model": model_cfg}

    def body(r: Run) -> None:
        r.model, task = build_finetune(run, model_cfg, pretrained_path, load_dataset(data_path), r.device)
        r.result = fit(r.model, task, cfg, r.out_dir, device=r.device, config_id=config_hash(full_config),
                       on_step=on_step)

    return execute(_finetune_identity(run), full_config, out_dir, body, steps_planned=cfg["steps"], device=device,
                   threads=threads, on_error=on_error, keep_best=cfg["keep_weights"], inputs=[pretrained_path, data_path])


def finetune_fuse_key(run: dict, pretrained_path, data_path) -> str | None:
    """Runs with equal keys train fused: same backbone weights, data, model and training values but lr
    (optimizers without a stacked form, ``fused.FUSED_OPTIMIZERS``, train alone: None)."""
    if run["train"]["optimizer"] not in FUSED_OPTIMIZERS:
        return None
    return stable_json([str(pretrained_path), str(data_path), run["model"], {**run["train"], "lr": None}])


def run_finetune_fused(runs: list[dict], pretrained_path, data_path, out_dirs: list, *, device: str = "auto",
                       threads: int = 1, on_error: str = "record", on_step=None) -> list[dict]:
    """Finetune several runs of one ``finetune_fuse_key`` as one batched model (``adaptlab.train.fused``); each run
    is built exactly as ``run_finetune`` builds it and writes the same records in its own directory."""
    fulls = [{"run": run, "model": run["model"]} for run in runs]
    jobs = [{"identity": _finetune_identity(run), "spec": full, "out_dir": out, "steps_planned": run["train"]["steps"],
             "on_error": on_error, "keep_best": run["train"]["keep_weights"], "inputs": [pretrained_path, data_path]}
            for run, full, out in zip(runs, fulls, out_dirs)]
    by_dir = {str(Path(out)): i for i, out in enumerate(out_dirs)}

    def body(todo: list[Run]) -> None:
        data = load_dataset(data_path)
        idx = [by_dir[str(r.out_dir)] for r in todo]
        built = [build_finetune(runs[i], runs[i]["model"], pretrained_path, data, todo[0].device) for i in idx]
        for r, (model, _) in zip(todo, built):
            r.model = model
        group = FusedRuns([m for m, _ in built], [t for _, t in built], [runs[i]["lr"] for i in idx],
                          runs[idx[0]]["train"], todo[0].device)
        results = fit(group, None, runs[idx[0]]["train"], [r.out_dir for r in todo], device=todo[0].device,
                      config_id=[fused_config_id(config_hash(fulls[i])) for i in idx], on_step=on_step)
        for r, result in zip(todo, results):
            r.result = result

    return execute_many(jobs, body, device=device, threads=threads)
