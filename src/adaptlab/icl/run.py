"""One run of the ICL study: build the world and the decoder, train with the shared loop, record the evaluations."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaptlab.config import config_hash, stable_json
from adaptlab.icl import MODEL_NAME, RAW_TABLES, SECTION, SUMMARY_FIELDS
from adaptlab.icl.data import ICLWorld, MultimodalWorld
from adaptlab.icl.model import ICLTransformer
from adaptlab.icl.task import ICLTask
from adaptlab.runner import Run, execute, execute_many
from adaptlab.train.fused import FUSED_OPTIMIZERS, FusedRuns, fused_config_id
from adaptlab.train.loop import fit


def build_world(spec: dict):
    d = spec["data"]
    world = ICLWorld(spec["K"], D=d["D"], L=d["L"], N=d["N"], B=d["B"], p_bursty=d["p_bursty"], p_novel=d["p_novel"],
                     eps=d["eps"], alpha=d["alpha"], novel_classes=d["novel_classes"], n_max=d["n_max"],
                     no_repeats=d["no_repeats"], seed=spec["seed"])
    if spec["kind"] == "icl_mm":
        s = spec["secondary"]
        world = MultimodalWorld(world, spec["K2"], D2=s["D2"], L2=s["L2"], eps2=s["eps2"], alpha2=s["alpha2"],
                                seed=spec["seed"])
    return world


def build_model(spec: dict):
    d, m = spec["data"], spec["model"]
    m2 = spec["secondary"]["D2"] if spec["kind"] == "icl_mm" else None
    return ICLTransformer(d["D"], d["L"], pos=spec["scheme"], n_layers=m["n_layers"], n_heads=m["n_heads"],
                          n_max=d["n_max"], mlp=m["mlp"], rope_base=m["rope_base"], m2_dim=m2)


def _eval_rows(run_id: str, step: int, metrics: dict) -> list[dict]:
    rows = []
    for key, val in metrics.items():
        if key in ("acc",):
            continue
        name, layer = key, 0
        if "_l" in key and key.rsplit("_l", 1)[1].isdigit():
            name, layer = key.rsplit("_l", 1)[0], int(key.rsplit("_l", 1)[1])
        rows.append({"run_id": run_id, "step": int(step), "layer": layer, "metric": name,
                     "value": None if val is None or not math.isfinite(val) else float(val)})
    return rows


def _identity(spec: dict) -> dict:
    cfg = spec["train"]
    return {"run_id": spec["run_id"], "kind": spec["kind"], "study": SECTION,
            "grid": "unimodal" if spec["kind"] == "icl_uni" else "multimodal", "backbone": "icl_decoder",
            "dataset": f"icl_K{spec['K']}" + (f"_K2_{spec['K2']}" if spec["kind"] == "icl_mm" else ""),
            "seed": spec["seed"], "lr": cfg["lr"], "optimizer": cfg["optimizer"], "trainable": "full"}


def _prepare(run: Run, spec: dict, init_weights) -> ICLTask:
    """Everything before training: the run's records-to-be, its world, its model (and stage-1 weights), its task
    and the step-0 evaluation. Returns the task; ``run.model`` is set."""
    run.extra.update(icl_scheme=spec["scheme"], icl_K=spec["K"], icl_K2=spec.get("K2"), icl_arm=spec.get("arm"))
    run.tables["icl_eval"] = ([], RAW_TABLES["icl_eval"])
    if spec["kind"] == "icl_uni":  # the rule's weights output, written on either path
        run.after.append(lambda: _save_weights(run.model, run.out_dir / MODEL_NAME))
    world = build_world(spec)
    torch.manual_seed(spec["seed"])
    run.model = model = build_model(spec)
    if init_weights:
        state = load_file(str(init_weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("projector.") for k in missing):
            raise ValueError(f"stage-1 weights do not fit: missing {missing}, unexpected {unexpected}")
    task = ICLTask(world, run.device, spec["seed"], eval_size=spec["data"]["eval_size"],
                   eval_batch_size=spec["train"]["eval_batch_size"])
    run.tables["icl_eval"][0].extend(_eval_rows(spec["run_id"], 0, task.evaluate(model.to(run.device), "val")))
    return task


def _finish(run: Run, spec: dict) -> None:
    """The evaluations of the log into ``icl_eval`` and the summary's ICL columns."""
    evals, result = run.tables["icl_eval"][0], run.result
    log = result.log
    for i, step in enumerate(log["step"]):
        if not math.isnan(log.get("val_acc", [math.nan] * len(log["step"]))[i]):
            evals += _eval_rows(spec["run_id"], step, {k[4:]: log[k][i] for k in log if k.startswith("val_")})
    final_step = max(e["step"] for e in evals)
    final = {r["metric"] + (f"_l{r['layer']}" if r["layer"] else ""): r["value"] for r in evals
             if r["step"] == final_step}
    last = spec["model"]["n_layers"]
    test = result.test or {}
    run.extra.update(icl_final_step=final_step, icl_ic_acc=final.get("ic_acc"),
                     icl_ic2_acc=final.get("ic2_acc"), icl_iw_acc=final.get("iw_acc"), icl_cla=final.get("ic_cla"),
                     icl_m2only_acc=final.get("m2only_acc"), icl_ih_last=final.get(f"ih_l{last}"),
                     icl_ph_first=final.get("ph_l1"), icl_test_ic_acc=test.get("ic_acc"),
                     icl_test_ic2_acc=test.get("ic2_acc"), icl_test_iw_acc=test.get("iw_acc"),
                     icl_test_m2only_acc=test.get("m2only_acc"))


def run_icl(spec: dict, out_dir: str | Path, *, init_weights: str | Path | None = None, device: str = "auto",
            threads: int = 1, on_error: str = "record") -> dict:
    """Train one ICL run with the shared loop and write summary, steps, the ``icl_eval`` raw table and weights."""

    def body(run: Run) -> None:
        task = _prepare(run, spec, init_weights)
        run.result = fit(run.model, task, spec["train"], run.out_dir, device=run.device, config_id=config_hash(spec))
        _finish(run, spec)

    return execute(_identity(spec), spec, out_dir, body, steps_planned=spec["train"]["steps"], device=device,
                   threads=threads, on_error=on_error, extra_fields=SUMMARY_FIELDS,
                   inputs=[init_weights] if init_weights else [])


def fuse_key(spec: dict) -> str | None:
    """ICL runs with equal keys train fused: one kind and positional scheme (the model's shapes), the same data,
    model and training values; K, K2, seed, arm and stage-1 weights may differ."""
    if spec["train"]["optimizer"] not in FUSED_OPTIMIZERS:
        return None
    return stable_json({k: v for k, v in spec.items() if k not in ("run_id", "K", "K2", "seed", "arm", "stage1")})


def run_icl_fused(specs: list[dict], out_dirs: list, init_weights: list, *, device: str = "auto", threads: int = 1,
                  on_error: str = "record") -> list[dict]:
    """Several ICL runs of one ``fuse_key`` as one batched model (``adaptlab.train.fused``), each prepared and
    recorded exactly as ``run_icl`` does it."""
    jobs = [{"identity": _identity(s), "spec": s, "out_dir": out, "steps_planned": s["train"]["steps"],
             "on_error": on_error, "extra_fields": SUMMARY_FIELDS, "inputs": [w] if w else []}
            for s, out, w in zip(specs, out_dirs, init_weights)]
    index = {str(Path(out)): i for i, out in enumerate(out_dirs)}

    def body(todo: list[Run]) -> None:
        idx = [index[str(r.out_dir)] for r in todo]
        tasks = [_prepare(r, specs[i], init_weights[i]) for r, i in zip(todo, idx)]
        cfg = specs[idx[0]]["train"]
        group = FusedRuns([r.model for r in todo], tasks, [specs[i]["train"]["lr"] for i in idx], cfg, todo[0].device)
        results = fit(group, None, cfg, [r.out_dir for r in todo], device=todo[0].device,
                      config_id=[fused_config_id(config_hash(specs[i])) for i in idx])
        for r, i, result in zip(todo, idx, results):
            r.result = result
            _finish(r, specs[i])

    return execute_many(jobs, body, device=device, threads=threads)


def _save_weights(model, path: Path) -> None:
    """The best-IC weights fit restored (the stage-1 checkpoint of the multimodal runs); empty for a failed run
    that never built its model."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()} if model is not None else {}
    save_file(state, str(path))


def _init(inputs: dict) -> str | None:
    init = inputs.get("init") or []
    init = [init] if isinstance(init, str) else list(init)
    return init[0] if init else None


def _icl_job(spec, i, p, out, threads):
    return run_icl(spec, out, init_weights=_init(i), device=p["device"], threads=threads, on_error=p["on_error"])


def _icl_fused_job(specs, inputs, params, outs, threads):
    return run_icl_fused(specs, outs, [_init(i) for i in inputs], device=params[0]["device"], threads=threads,
                         on_error=params[0]["on_error"])


# rule -> the job: (spec, named inputs, params, run directory, threads); workflow/scripts/study_run.py calls it
RULES = {"icl_uni": _icl_job, "icl_mm": _icl_job}
# rule -> (fuse key of a spec, the fused job: (specs, inputs, params, run directories, threads)); adaptlab.packs
FUSED = {"icl_uni": (fuse_key, _icl_fused_job), "icl_mm": (fuse_key, _icl_fused_job)}
