"""One tiny run of every registered study on a device, through the same run functions the Snakemake rules call.

Used by ``gpu_check.py``. The config below is hand-written rather than read from ``configs/test.yaml`` so that
this check does not change when a preset is retuned: it is the tests' mini configs (tests/test_{plasticity,
precond,peft,icl,continual}.py) in one dict, validated by ``adaptlab.config.validate_config`` and expanded by
each study's own ``specs``, so the runs are real runs of the pipeline (records written, status checked), only
tiny. The wiring (which file each run reads) mirrors the rules in ``rules/<study>.smk``.

A study passes when every run it makes ends with status ``ok`` on the requested device. ``run_continual`` pins its
runs to the CPU (its models are a few thousand parameters: faster on the CPU than a GPU launch per op) and takes
no ``device``; while that holds, continual is checked on the CPU and reported as such. Its fused groups
(``run_continual_fused``: the seeds of one method as one batched model) are checked on the device.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

SMALL = {"kind": "procedural", "image_size": 16, "n_val": 32, "n_test": 32}
TRAIN = {"steps": 4, "batch_size": 16, "eval_every": 2, "ckpt_every": 0}


def mini_config(device: str) -> dict:
    return {
        "device": device,
        "datasets": {"src": {**SMALL, "classes": 4, "n_train": 128, "seed": 0},
                     "tgt": {**SMALL, "classes": 3, "class_seed": 1, "n_train": 64, "seed": 1}},
        "model": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        "pretrain": {"dataset": "src", "train": {**TRAIN, "optimizer": "adamw", "lr": 3e-3, "batch_size": 32}},
        "trainable_sets": {"mha": ["blocks.*.attn.*", "norm.*"]},
        "finetune": {"defaults": TRAIN, "on_error": "raise",
                     "grids": {"components": {"study": "plasticity", "datasets": ["tgt"], "seeds": [0], "lrs": [0.05],
                                              "optimizers": ["adamw"], "trainable": ["mha"]}}},
        "plasticity": {"n_pairs": 16, "batch_size": 16, "linear_probe": {"max_iter": 100}},
        "precond": {"seeds": [0], "phases": ["finetune"],
                    "arms": {"baseline": {"kind": "timm"}, "col": {"kind": "preconditioned", "form": "col"}},
                    "finetune": {"dataset": "tgt", "train": {**TRAIN, "optimizer": "adamw", "lr": 1e-3}},
                    "probe": {"every": 2, "batch_size": 8}, "timing": {"steps": 2, "repeats": 1, "batch_size": 4}},
        "peft": {"seeds": [0], "train": {"steps": 3, "batch_size": 16, "eval_every": 3, "ckpt_every": 0},
                 "head": {"dim": 16, "n_heads": 2, "n_levels": 2, "n_points": 2, "n_queries": 4}, "latency_batch": 4,
                 "seg_datasets": {"segsrc": {"kind": "procedural", "image_size": 16, "n_train": 32, "n_val": 8,
                                             "n_test": 8},
                                  "segtgt": {"kind": "procedural", "domain": "shifted", "image_size": 16, "n_train": 32,
                                             "n_val": 8, "n_test": 8, "seed": 1}},
                 "tasks": {"cls": {"kind": "classification", "dataset": "tgt", "arms": ["lora"]},
                           "seg": {"kind": "segmentation", "dataset": "segtgt", "source": "segsrc",
                                   "source_train": {"steps": 3}, "arms": ["adapter"]}},
                 "arms": {"adapter": {"method": "adapter", "n_adapters": [1]},
                          "lora": {"method": "lora", "rank": [2], "targets": ["qkv"]}}},
        "icl": {"data": {"D": 16, "L": 16, "N": 4, "B": 2, "n_max": 8, "eval_size": 64},
                "train": {"steps": 4, "eval_every": 2, "batch_size": 32},
                "unimodal": {"schemes": ["rope"], "Ks": [32], "seeds": [0]},
                "multimodal": {"stage1": {"scheme": "rope", "K": 32}, "Ks": [16], "D2": 8, "L2": 8,
                               "arms": ["pretrained"], "train": {"steps": 2, "eval_every": 2}}},
        "continual": {"benchmarks": {"rl": {"inputs": "gaussian", "labels": "random", "n": 64, "dim": 8}},
                      "models": {"mlp": {"kind": "mlp", "width": 16, "depth": 2}},
                      "methods": {"adamo": {"optimizer": "adamo", "isometry_lambda": 0.1},
                                  "redo": {"optimizer": "adam", "redo_tau": 0.1}},
                      "grids": {"t": {"benchmarks": ["rl"], "models": ["mlp"], "methods": ["adamo", "redo"], "seeds": [0, 1],
                                      "tasks": 2, "steps": 4, "summary_tasks": 1, "probe": 32, "ntk_every": 0,
                                      "ntk_probe": 4}}},
    }


class Pipeline:
    """The mini config's shared inputs (datasets, the pretrained backbone) under ``root``, built on first use."""

    def __init__(self, root: Path, device: str):
        from adaptlab.config import validate_config

        self.root, self.device = Path(root), device
        self.cfg = validate_config(mini_config(device), source="gpu_studies.mini_config")
        self._backbone: Path | None = None

    def data(self, name: str) -> Path:
        from adaptlab.data.prepare import prepare_dataset

        path = self.root / "data" / f"{name}.safetensors"
        if not path.exists():
            prepare_dataset(name, self.cfg["datasets"][name], path)
        return path

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def backbone(self) -> Path:
        """The `base` backbone, pretrained on the device (rule pretrain)."""
        from adaptlab.config import pretrain_spec
        from adaptlab.runner import run_pretrain

        if self._backbone is None:
            out = self.run_dir("pretrain/base")
            run_pretrain(pretrain_spec(self.cfg), self.data("src"), out, device=self.device)
            self._backbone = out / "model.safetensors"
        return self._backbone


def _plasticity(p: Pipeline) -> list[dict]:
    from adaptlab.config import expand_runs
    from adaptlab.plasticity import RUN_IDS, specs, study_pairs
    from adaptlab.plasticity.run import run_analysis, run_linear_probe
    from adaptlab.runner import run_finetune

    rows = []
    for run in (r for r in expand_runs(p.cfg) if r.study == "plasticity"):  # rule finetune
        rows.append(run_finetune(run.as_dict(), run.model, p.backbone(), p.data(run.dataset),
                                 p.run_dir(run.run_id), device=p.device, on_error="raise"))
    analysis = {RUN_IDS["analysis"].format(backbone=b, dataset=d) for b, d in study_pairs(p.cfg)}
    for rid, spec in specs(p.cfg).items():
        if rid in analysis:  # rule plasticity_analysis
            rows.append(run_analysis(spec, p.backbone(), p.data(spec["source"]), p.data(spec["dataset"]),
                                     p.run_dir(rid), device=p.device, on_error="raise"))
        else:  # rule linear_probe
            rows.append(run_linear_probe(spec, p.backbone(), p.data(spec["dataset"]), p.run_dir(rid),
                                         device=p.device, on_error="raise"))
    return rows


def _precond(p: Pipeline) -> list[dict]:
    from adaptlab.precond import TIMING_RUN, specs
    from adaptlab.precond.run import run_precond

    # the timing run is CPU-only by design (precond/run.py: run_timing); the training runs use the device
    return [run_precond(spec, p.data(spec["dataset"]), p.backbone(), p.run_dir(rid), device=p.device)
            for rid, spec in specs(p.cfg).items() if rid != TIMING_RUN]


def _peft(p: Pipeline) -> list[dict]:
    from adaptlab.peft import RUN_IDS, SOURCE_ARM, specs
    from adaptlab.peft.run import run_peft
    from adaptlab.peft.seg_data import build_seg_dataset, save_seg_dataset

    seg = {}
    for name, spec in p.cfg["peft"]["seg_datasets"].items():  # rule peft_seg_data
        seg[name] = p.root / "data" / f"{name}.seg.safetensors"
        save_seg_dataset(build_seg_dataset(name, spec), seg[name])
    rows = []
    for rid, spec in specs(p.cfg).items():  # a task's source run comes before its arms
        task = spec["task"]
        data = p.data(spec["dataset"]) if task["kind"] == "classification" else seg[spec["dataset"]]
        source = None  # rule peft_run: an arm of a task with a source stage reads the source run's weights
        if task["source"] and spec["arm"]["label"] != SOURCE_ARM:
            source = p.run_dir(RUN_IDS["source"].format(ptask=task["name"])) / "model.safetensors"
        rows.append(run_peft(spec, p.backbone(), data, p.run_dir(rid), source_path=source, device=p.device,
                             on_error="raise"))
    return rows


def _icl(p: Pipeline) -> list[dict]:
    from adaptlab.icl import MODEL_NAME, specs
    from adaptlab.icl.run import run_icl

    rows = []
    for rid, spec in specs(p.cfg).items():  # unimodal runs first: the multimodal ones start from their weights
        init = p.run_dir(spec["stage1"]) / MODEL_NAME if spec.get("stage1") else None
        rows.append(run_icl(spec, p.run_dir(rid), init_weights=init, device=p.device, on_error="raise"))
    return rows


def _continual(p: Pipeline) -> list[dict]:
    """The runs one by one (on the CPU while run_continual pins them there), then the seeds of each method as one
    fused group on the device itself (fusion's case is the GPU); a fused run not ``ok`` on the device raises."""
    from adaptlab.continual import specs
    from adaptlab.continual.run import fuse_key, run_continual, run_continual_fused

    kw = {} if _continual_on_cpu() else {"device": p.device}
    all_specs = specs(p.cfg)
    rows = [run_continual(spec, p.run_dir(rid), on_error="raise", **kw) for rid, spec in all_specs.items()]
    groups: dict[str, list[str]] = {}
    for rid, spec in all_specs.items():
        if fuse_key(spec) is not None:
            groups.setdefault(fuse_key(spec), []).append(rid)
    for rids in (g for g in groups.values() if len(g) > 1):
        fused = run_continual_fused([all_specs[r] for r in rids], [p.run_dir(f"fused/{r}") for r in rids],
                                    on_error="raise", device=p.device)
        bad = [f"{r['run_id']} fused: status {r['status']} on {r['device']}" for r in fused
               if r["status"] != "ok" or not str(r["device"]).startswith(p.device)]
        if bad:
            raise RuntimeError("; ".join(bad))
    return rows


def _continual_on_cpu() -> bool:
    """Whether run_continual pins its runs to the CPU (it takes no ``device``)."""
    import inspect

    from adaptlab.continual.run import run_continual

    return "device" not in inspect.signature(run_continual).parameters


STUDY_RUNS = {"plasticity": _plasticity, "precond": _precond, "peft": _peft, "icl": _icl, "continual": _continual}


def run_all(root: Path, device: str, say=print) -> dict[str, bool]:
    """Run every registered study's tiny runs on ``device``; print one ok/FAILED line each; study -> passed."""
    from adaptlab.studies import study_sections

    missing = [s for s in study_sections() if s not in STUDY_RUNS]
    results = {s: False for s in missing}
    for s in missing:
        say(f"  {s:<11} FAILED  registered study without a tiny run in benchmarks/gpu_studies.py")
    t0 = time.perf_counter()
    try:
        pipe = Pipeline(root, device)
        pipe.backbone()
        say(f"  {'pretrain':<11} ok      backbone pretrained on {device} ({time.perf_counter() - t0:.1f} s)")
    except Exception as err:  # noqa: BLE001 - every study needs it: report and stop
        say(f"  {'pretrain':<11} FAILED  {type(err).__name__}: {err}")
        traceback.print_exc()
        return {**results, **{s: False for s in STUDY_RUNS}}
    for section in (s for s in study_sections() if s in STUDY_RUNS):
        t0 = time.perf_counter()
        want = "cpu" if section == "continual" and _continual_on_cpu() else device
        try:
            rows = STUDY_RUNS[section](pipe)
            bad = [f"{r['run_id']}: status {r['status']} on {r['device']}" for r in rows
                   if r["status"] != "ok" or not str(r["device"]).startswith(want)]
            if not rows or bad:
                raise RuntimeError("; ".join(bad) or "no runs")
        except Exception as err:  # noqa: BLE001 - one study's failure must not hide the others'
            results[section] = False
            say(f"  {section:<11} FAILED  {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            traceback.print_exc()
            continue
        results[section] = True
        note = " (run_continual pins its runs to the CPU)" if want != device else ""
        say(f"  {section:<11} ok      {len(rows)} run(s) on {want}{note}, {time.perf_counter() - t0:.1f} s")
    return results
