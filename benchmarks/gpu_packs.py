"""Runs per minute on a device: one run per process vs a pack (one process, its runs one after another) vs a fused
pack (one process, its runs as one batched model), for slices of ``configs/cpu.yaml``'s ICL and continual grids.

    python benchmarks/gpu_packs.py --device cuda [--scenarios icl,continual_mlp,continual_vit]
                                   [--icl-steps 1000] [--tasks 3] [--one-runs 0] [--modes one,packed,fused]

No Snakemake (a GPU machine may not have it): each mode is timed as the processes a job would start, this script
re-run as a worker (``--worker``) that imports the stack as a job does (``adaptlab.jobstart.start_job``) and calls
the study's run function, so every mode pays its own process start, imports and CUDA context. Scenarios:

- icl: the APE half of the unimodal sweep, K 512 … 4096 × 2 seeds = 8 runs (one ``fuse_key``), ``--icl-steps``
  steps each (the preset's 3000 by default is too long for a short device lease);
- continual_mlp: the rl_gauss MLP method grid, 11 methods × 3 seeds = 33 runs, ``--tasks`` tasks of 300 steps;
- continual_vit: the rl_digits ViT method grid, 6 methods × 3 seeds = 18 runs, ``--tasks`` tasks of 300 steps.

A continual run alone is pinned to the CPU (``run_continual``: its models are a few thousand parameters), so the
continual ``one`` and ``packed`` modes run on the CPU whatever ``--device`` says; ``fused`` runs on ``--device``.
``--one-runs N`` times the one-per-process mode on the first N runs only (the rate is runs per minute either way).
Printed per mode: runs, wall seconds, runs/min and the speed-up over one run per process (the first mode given),
all from this one invocation; then, fused vs the unfused mode before it (packed, else one), the largest difference
of the runs' recorded metric and their statuses.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# scenario -> (rule, metric compared packed vs fused, spec filter on configs/cpu.yaml's specs)
SCENARIOS = {
    "icl": ("icl_uni", "icl_ic_acc",
            lambda s: s["kind"] == "icl_uni" and s["scheme"] == "ape" and s["K"] in (512, 1024, 2048, 4096)),
    "continual_mlp": ("continual_run", "acc_last",
                      lambda s: s["model_name"] == "mlp" and s["benchmark_name"] == "rl_gauss"),
    "continual_vit": ("continual_run", "acc_last",
                      lambda s: s["model_name"] == "vit" and s["benchmark_name"] == "rl_digits"),
}


def scenario_specs(name: str, icl_steps: int, tasks: int) -> list[dict]:
    from adaptlab import continual, icl
    from adaptlab.config import load_config

    cfg = load_config(REPO / "configs/cpu.yaml")
    study = icl if name == "icl" else continual
    specs = [copy.deepcopy(s) for s in study.specs(cfg).values() if SCENARIOS[name][2](s)]
    for s in specs:
        if name == "icl":
            s["train"].update(steps=icl_steps, eval_every=max(1, icl_steps // 2), ckpt_every=0)
        else:
            s["grid_cfg"].update(tasks=tasks, summary_tasks=min(tasks, s["grid_cfg"]["summary_tasks"]))
    return specs


def worker(mode: str, rule: str, specs: list[dict], outs: list[str], device: str) -> int:
    """One job's process: imports as a job does, then the runs (one, one after another, or fused) through the jobs
    the rule's own Snakemake jobs call (``studies.run_job``, the run module's ``FUSED``), with no inputs (none of
    these runs reads a file) and the job's params (``device``; continual's jobs take the job's device, ``auto``)."""
    from adaptlab.jobstart import start_job
    from adaptlab.studies import run_job, study_run_module

    start_job([(rule, s) for s in specs])
    params = {"device": device, "on_error": "record"}
    if mode == "fused":
        fused_job = study_run_module(rule).FUSED[rule][1]
        rows = fused_job(specs, [{}] * len(specs), [params] * len(specs), outs, 1)
    else:
        rows = [run_job(rule, s, {}, params, o, 1) for s, o in zip(specs, outs)]
    bad = [r.get("run_id") for r in rows if r.get("status") != "ok"]
    if bad:
        print(f"worker {mode}: runs not ok: {bad}", file=sys.stderr)
    return 1 if bad else 0


def spawn(root: Path, mode: str, rule: str, specs: list[dict], outs: list[str], device: str) -> float:
    job = root / f"job_{mode}_{len(list(root.glob('job_*')))}.json"
    job.write_text(json.dumps({"mode": mode, "rule": rule, "specs": specs, "outs": outs, "device": device}))
    # a CPU job sees no GPU: continual's jobs take ``device: auto``, which would otherwise pick a visible one
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(job)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{mode} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def metrics(outs: list[str], column: str) -> tuple[list, list]:
    from adaptlab.records import read_summary

    rows = [read_summary(Path(o) / "summary.parquet") for o in outs]
    return [r.get(column) for r in rows], [r["status"] for r in rows]


def run_scenario(name: str, args, root: Path) -> None:
    rule, column, _ = SCENARIOS[name]
    specs = scenario_specs(name, args.icl_steps, args.tasks)
    n_one = min(args.one_runs or len(specs), len(specs))
    cpu_note = " (one and packed on the CPU: run_continual)" if rule == "continual_run" else ""
    print(f"\n{name}: {len(specs)} runs on {args.device}{cpu_note}")
    print(f"  {'mode':<8}{'runs':>5}{'wall s':>9}{'runs/min':>10}{'speed-up':>10}", flush=True)
    walls, outs = {}, {}
    for mode in args.modes.split(","):
        outs[mode] = [str(root / name / mode / s["run_id"]) for s in specs]
        if mode == "one":
            wall = sum(spawn(root, mode, rule, [s], [o], args.device) for s, o in zip(specs[:n_one], outs[mode]))
            n = n_one
        else:
            wall, n = spawn(root, mode, rule, specs, outs[mode], args.device), len(specs)
        walls[mode] = (n, wall)
        rate = n / wall * 60
        base = next(iter(walls.values()))
        base = base[0] / base[1] * 60
        print(f"  {mode:<8}{n:5d}{wall:9.1f}{rate:10.1f}{rate / base:9.2f}x", flush=True)
    if "fused" not in walls or len(walls) < 2:
        return
    ref = "packed" if "packed" in walls else "one"
    packed, st_p = metrics(outs[ref][:walls[ref][0]], column)
    fused, st_f = metrics(outs["fused"][:walls[ref][0]], column)
    pairs = [(a, b) for a, b in zip(packed, fused) if a is not None and b is not None]
    nan = float("nan")
    print(f"  {ref} vs fused {column} over {len(pairs)} runs: max |diff| "
          f"{max((abs(a - b) for a, b in pairs), default=nan):.4f}, mean {ref} "
          f"{sum(a for a, _ in pairs) / len(pairs) if pairs else nan:.4f}, fused "
          f"{sum(b for _, b in pairs) / len(pairs) if pairs else nan:.4f}; status ok: {ref} "
          f"{st_p.count('ok')}/{len(st_p)}, fused {st_f.count('ok')}/{len(st_f)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--icl-steps", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=3, help="continual tasks per run (300 steps each)")
    ap.add_argument("--one-runs", type=int, default=0, help="time one-per-process on the first N runs (0: all)")
    ap.add_argument("--modes", default="one,packed,fused", help="of one, packed, fused; speed-ups over the first")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        sys.exit(worker(job["mode"], job["rule"], job["specs"], job["outs"], job["device"]))
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_packs: no CUDA GPU (torch {torch.__version__}); nothing measured. Use --device cpu to try it.")
        return
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"gpu_packs: torch {torch.__version__}, {args.device} ({name}); ICL {args.icl_steps} steps per run, "
          f"continual {args.tasks} tasks × 300 steps per run")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios.split(","):
            run_scenario(name, args, Path(tmp))


if __name__ == "__main__":
    main()
