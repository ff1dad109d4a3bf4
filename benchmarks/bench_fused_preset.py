"""Milliseconds per training step and run of ``configs/cpu.yaml``'s fused groups: grouped forward vs vmap vs alone.

    python benchmarks/bench_fused_preset.py [--steps 20] [--groups plasticity,icl_ape,icl_rope] [--runs 28]
                                            [--precision auto,bf16]

- plasticity: the first ``--runs`` runs (in run-id order, as a pack holds them) of the Study 1 component grid on
  ``sketch``: the preset's ViT (width 64, 4 blocks, 17 tokens), SGD, batch 64, each run with its trainable set,
  lr and seed, built as its job builds it (``runner.build_finetune``) from a randomly initialised backbone (the
  step's cost does not depend on the weights); the dataset is generated into a temporary directory: nothing needs
  to exist beforehand.
- icl_ape, icl_rope: the 6 unimodal runs of one scheme in a pack (3 K × 2 seeds), 128 sequences a step.

Each group steps through the loop's own group methods (``bench_fused_step.ms_per_step``: set_lr, the loss,
backward and grad norm, the optimizer step) with its grouped forward (``train.grouped``), then through vmap (the
same group with the grouped path switched off), then the first run of each trainable set (plasticity) or the first
run (ICL) alone through ``OneRun``; all of it once per ``--precision`` (``train.precision``: auto = float32 on the
CPU; bf16 = bf16 autocast). Printed: ms per step and per run-step, all measured in this one invocation.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_step import ms_per_step  # noqa: E402

from adaptlab.config import expand_runs, load_config, validate_config  # noqa: E402
from adaptlab.jobstart import keep_freed_memory  # noqa: E402
from adaptlab.train.device import set_cpu_math  # noqa: E402
from adaptlab.train.fused import FusedRuns  # noqa: E402
from adaptlab.train.loop import OneRun  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "configs/cpu.yaml"
CPU = torch.device("cpu")


def plasticity(n: int, tmp: Path):
    """(batch size, built runs: (label, model, task, lr, train cfg)) of the component grid's first ``n`` runs on
    sketch, each built by ``runner.build_finetune`` from a randomly initialised backbone."""
    from safetensors.torch import save_file

    from adaptlab.data.prepare import prepare_dataset
    from adaptlab.data.store import load_dataset
    from adaptlab.models.vit import create_vit
    from adaptlab.runner import build_finetune

    cfg = load_config(PRESET)
    runs = sorted((r.as_dict() for r in expand_runs(cfg) if r.grid == "components" and r.dataset == "sketch"),
                  key=lambda r: r["run_id"])[:n]
    prepare_dataset("sketch", cfg["datasets"]["sketch"], tmp / "sketch.safetensors")
    data = load_dataset(tmp / "sketch.safetensors")
    save_file(create_vit(runs[0]["model"], data.num_classes).state_dict(), str(tmp / "backbone.safetensors"))
    built = [(r["trainable"], *build_finetune(r, r["model"], tmp / "backbone.safetensors", data, CPU), r["lr"],
              r["train"]) for r in runs]
    return 64, built


def icl(scheme: str):
    from adaptlab.icl import run as icl_run
    from adaptlab.icl.task import ICLTask
    from adaptlab.studies import study

    cfg = validate_config(yaml.safe_load(PRESET.read_text()))
    specs = [s for s in study("icl").specs(cfg).values() if s["kind"] == "icl_uni" and s["scheme"] == scheme][:6]
    built = []
    for s in specs:
        torch.manual_seed(s["seed"])
        model = icl_run.build_model(s)
        built.append((f"K{s['K']}", model, ICLTask(icl_run.build_world(s), CPU, s["seed"], eval_size=100),
                      s["train"]["lr"], s["train"]))
    return cfg["icl"]["train"]["batch_size"], built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--groups", default="plasticity,icl_ape,icl_rope")
    ap.add_argument("--runs", type=int, default=28, help="plasticity runs in the group (a pack holds 28)")
    ap.add_argument("--precision", default="auto", help="comma-separated train.precision values to time (auto,bf16)")
    args = ap.parse_args()
    keep_freed_memory()
    set_cpu_math(1)
    print(f"{'group':10s} {'precision':9s} {'mode':8s} {'runs':>4s} {'ms/step':>9s} {'ms/run-step':>12s}  (cpu, 1 thread)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.groups.split(","):
            for precision in args.precision.split(","):
                batch, built = plasticity(args.runs, Path(tmp)) if name == "plasticity" else icl(name.split("_")[1])
                built = [(*b[:4], {**b[4], "precision": precision}) for b in built]
                group = FusedRuns([b[1] for b in built], [b[2] for b in built], [b[3] for b in built], built[0][4], CPU)
                for mode in ("grouped", "vmap"):
                    group._grouped_loss = mode == "grouped"
                    ms = ms_per_step(group, args.steps, batch)
                    print(f"{name:10s} {precision:9s} {mode:8s} {len(built):4d} {ms:9.1f} {ms / len(built):12.2f}",
                          flush=True)
                seen = set()
                for label, model, task, _, train in built:
                    if label in seen or (name != "plasticity" and seen):
                        continue
                    seen.add(label)
                    ms = ms_per_step(OneRun(model, task, train, CPU), args.steps, batch)
                    print(f"{name:10s} {precision:9s} {'alone':8s} {1:4d} {ms:9.1f} {ms:12.2f}  ({label})", flush=True)


if __name__ == "__main__":
    main()
