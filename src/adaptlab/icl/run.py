"""One run of the ICL study: build the world and the decoder, train with the shared loop, record the evaluations."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaptlab.config import config_hash
from adaptlab.icl import MODEL_NAME, RAW_TABLES, SECTION, SUMMARY_FIELDS
from adaptlab.icl.data import ICLWorld, MultimodalWorld
from adaptlab.icl.model import ICLTransformer
from adaptlab.icl.task import ICLTask
from adaptlab.runner import Run, execute
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


def run_icl(spec: dict, out_dir: str | Path, *, init_weights: str | Path | None = None, device: str = "auto",
            threads: int = 1, on_error: str = "record") -> dict:
    """Train one ICL run with the shared loop and write summary, steps, the ``icl_eval`` raw table and weights."""
    cfg = spec["train"]
    identity = {"run_id": spec["run_id"], "kind": spec["kind"], "study": SECTION,
                "grid": "unimodal" if spec["kind"] == "icl_uni" else "multimodal", "backbone": "icl_decoder",
                "dataset": f"icl_K{spec['K']}" + (f"_K2_{spec['K2']}" if spec["kind"] == "icl_mm" else ""),
                "seed": spec["seed"], "lr": cfg["lr"], "optimizer": cfg["optimizer"],
                "trainable": "full"}

    def body(run: Run) -> None:
        run.extra.update(icl_scheme=spec["scheme"], icl_K=spec["K"], icl_K2=spec.get("K2"), icl_arm=spec.get("arm"))
        evals: list[dict] = []
        run.tables["icl_eval"] = (evals, RAW_TABLES["icl_eval"])
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
                       eval_batch_size=cfg["eval_batch_size"])
        evals += _eval_rows(spec["run_id"], 0, task.evaluate(model.to(run.device), "val"))
        run.result = result = fit(model, task, cfg, run.out_dir, device=run.device, config_id=config_hash(spec))
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

    return execute(identity, spec, out_dir, body, steps_planned=cfg["steps"], device=device, threads=threads,
                   on_error=on_error, extra_fields=SUMMARY_FIELDS, inputs=[init_weights] if init_weights else [])


def _save_weights(model, path: Path) -> None:
    """The best-IC weights fit restored (the stage-1 checkpoint of the multimodal runs); empty for a failed run
    that never built its model."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()} if model is not None else {}
    save_file(state, str(path))


def _icl_job(spec, i, p, out, threads):
    init = i.get("init") or []
    init = [init] if isinstance(init, str) else list(init)
    return run_icl(spec, out, init_weights=init[0] if init else None, device=p["device"], threads=threads,
                   on_error=p["on_error"])


# rule -> the job: (spec, named inputs, params, run directory, threads); workflow/scripts/study_run.py calls it
RULES = {"icl_uni": _icl_job, "icl_mm": _icl_job}
