"""Runs per minute: one run per process vs run packs vs fused packs, through Snakemake (2 cores by default).

    python benchmarks/bench_packs.py [--scenarios finetune,icl,continual] [--default] [--cores 2]
    python benchmarks/bench_packs.py --preset cpu [--scenarios plasticity,continual,icl]

Each scenario is one grid of the default config (config.yaml), run three ways in fresh copies of the workflow that
share the prepared data and backbone (made once, copied, not timed): ``pack: 1`` (one process per run: a job per
run, each paying the torch/timm import and the data load), ``pack: N`` (one process per pack) and ``pack: N`` with
``fuse: true`` (the pack's same-shape runs as one batched model). Printed per mode: runs, wall seconds, runs/min
and the speed-up over one run per process, all measured in this one invocation.

- finetune: the Study 1 component grid (2 datasets × 7 trainable sets × 2 lrs = 28 runs), packs of 14;
- icl: the unimodal sweep with 2 seeds (2 schemes × 2 K × 2 seeds = 8 runs), packs of 4 (one per scheme, fused);
- continual: the method grid with 3 seeds (9 methods × 3 seeds = 27 runs), packs of 14 (fused: a pack's runs step
  together, across methods; ``continual.run.fuse_key``).

Packs are sized so that there are at least as many packs as cores: a pack is one process on one core.

``--preset cpu`` runs slices of ``configs/cpu.yaml`` at that preset's run sizes, one run per process vs packed vs
fused (the same-time ratio for the preset's arms, which take too long to time twice in full):

- plasticity: the Study 1 component grid on one setting (sketch: 7 sets × 4 lrs × 3 seeds = 84 runs), packs of 21
  (the preset's 28 give 12 packs over its 4 settings; 21 gives this slice 4 packs, an even load on 2 cores);
- continual: the MLP method grid on one benchmark (rl_gauss: 11 methods × 3 seeds = 33 runs), packs of 17 (2 packs;
  the preset's 11 gives 3 over one benchmark, which leaves a core idle for the last).
- icl: the APE half of the unimodal sweep on 4 K (512 … 4096) × 2 seeds = 8 runs of 3000 steps, packs of 4 (2
  packs; a pack holds one scheme, so a mixed slice would load the cores unevenly).

``--default`` also times the preset's whole pipeline (``config.yaml``: the default pipeline) from a clean
``results/``: as configured (packed) and with every pack set to 1 (one run per job, the pipeline before packs).
"""
from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("plasticity", "precond", "peft", "icl", "continual")


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, dest / name)
    for name in ("rules", "workflow", "configs", "profiles"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def snakemake(wd: Path, cfg: dict, targets: list[str], cores: int) -> float:
    (wd / "configs/bench.yaml").write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    # targets before --configfile: Snakemake reads the words after it as more config files
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), *targets,
                           "--configfile", "configs/bench.yaml"], cwd=wd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"snakemake in {wd} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def unpacked(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for grid in cfg["finetune"]["grids"].values():
        grid.update(pack=1, fuse=False)
    for section in SECTIONS:
        if section in cfg:
            cfg[section]["pack"] = 1
            cfg[section].pop("fuse", None)
    return cfg


def _finetune(cfg: dict, mode: str) -> dict:
    grids = cfg["finetune"]["grids"]
    grids["components"].update(pack=14 if mode != "one" else 1, fuse=mode == "fused")
    return cfg


def _icl(cfg: dict, mode: str) -> dict:
    cfg["icl"]["unimodal"]["seeds"] = [0, 1]
    cfg["icl"].update(pack=4 if mode != "one" else 1, fuse=mode == "fused")
    return cfg


def _continual(cfg: dict, mode: str) -> dict:
    for grid in cfg["continual"]["grids"].values():
        grid["seeds"] = [0, 1, 2]
    cfg["continual"].update(pack=14 if mode != "one" else 1, fuse=mode == "fused")
    return cfg


def _targets(name: str, cfg: dict) -> list[str]:
    from adaptlab import continual, icl
    from adaptlab.config import expand_runs, validate_config

    cfg = validate_config(cfg)
    if name == "finetune":
        ids = [r.run_id for r in expand_runs(cfg) if r.grid == "components"]
    elif name == "icl":
        ids = [r for r, s in icl.specs(cfg).items() if s["kind"] == "icl_uni"]
    else:
        ids = list(continual.specs(cfg))
    return [f"results/runs/{r}/summary.parquet" for r in ids]


def _cpu_plasticity(cfg: dict, mode: str) -> dict:
    grid = cfg["finetune"]["grids"]["components"]
    grid.update(datasets=["sketch"], pack=21 if mode != "one" else 1, fuse=mode == "fused")
    return cfg


def _cpu_continual(cfg: dict, mode: str) -> dict:
    cfg["continual"]["grids"] = {"mlp": {**cfg["continual"]["grids"]["mlp"], "benchmarks": ["rl_gauss"]}}
    cfg["continual"].update(pack=17 if mode != "one" else 1, fuse=mode == "fused")
    return cfg


def _cpu_icl(cfg: dict, mode: str) -> dict:
    cfg["icl"]["unimodal"]["Ks"] = [512, 1024, 2048, 4096]  # keeps the multimodal stage-1 run (rope, K 4096)
    cfg["icl"].update(pack=4 if mode != "one" else 1, fuse=mode == "fused")
    return cfg


def _cpu_targets(name: str, cfg: dict) -> list[str]:
    targets = _targets("finetune" if name == "plasticity" else name, cfg)
    return [t for t in targets if "/uni/ape/" in t] if name == "icl" else targets


# preset -> (config file, data and backbones to prepare untimed, {scenario: (edit, modes, targets)})
PRESETS = {
    "default": ("config.yaml", ["results/runs/pretrain/base/model.safetensors", "results/data/noisy.safetensors",
                                "results/data/sketch.safetensors"],
                {"finetune": (_finetune, ("one", "packed", "fused"), _targets),
                 "icl": (_icl, ("one", "packed", "fused"), _targets),
                 "continual": (_continual, ("one", "packed", "fused"), _targets)}),
    "cpu": ("configs/cpu.yaml", ["results/runs/pretrain/base/model.safetensors", "results/data/sketch.safetensors"],
            {"plasticity": (_cpu_plasticity, ("one", "packed", "fused"), _cpu_targets),
             "continual": (_cpu_continual, ("one", "packed", "fused"), _cpu_targets),
             "icl": (_cpu_icl, ("one", "packed", "fused"), _cpu_targets)}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--scenarios", help="comma-separated (default: every scenario of the preset)")
    ap.add_argument("--default", action="store_true", help="also time the preset's whole pipeline, packed and not")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    config_file, prepare, scenarios = PRESETS[args.preset]
    base = unpacked(yaml.safe_load((REPO / config_file).read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep = copy_workflow(tmp / "prep")  # the data and the backbone every scenario reads, made once
        snakemake(prep, base, prepare, args.cores)
        print(f"{'scenario':10s} {'mode':7s} {'runs':>5s} {'wall s':>8s} {'runs/min':>9s} {'speed-up':>9s}")
        for name in (args.scenarios or ",".join(scenarios)).split(","):
            edit, modes, target_files = scenarios[name]
            first = None
            for mode in modes:
                cfg = edit(copy.deepcopy(base), mode)
                wd = copy_workflow(tmp / f"{name}_{mode}")
                shutil.copytree(prep / "results", wd / "results")
                shutil.copytree(prep / ".snakemake", wd / ".snakemake", ignore=shutil.ignore_patterns("locks"))
                targets = target_files(name, cfg)
                wall = snakemake(wd, cfg, targets, args.cores)
                rate = len(targets) / wall * 60
                first = first or rate
                print(f"{name:10s} {mode:7s} {len(targets):5d} {wall:8.1f} {rate:9.1f} {rate / first:8.2f}x",
                      flush=True)
        if args.default:
            packed = yaml.safe_load((REPO / config_file).read_text())
            for label, cfg in ((f"packed ({config_file})", packed), ("one run per job", base)):
                wd = copy_workflow(tmp / f"default_{label.split()[0]}")
                wall = snakemake(wd, cfg, [], args.cores)
                print(f"default pipeline, clean results/, {label:22s}: {wall:7.1f} s ({wall / 60:.1f} min)",
                      flush=True)


if __name__ == "__main__":
    main()
