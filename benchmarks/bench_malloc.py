"""What ``adaptlab.jobstart.keep_freed_memory`` saves a fused group's step: ms per step and page faults per step with
glibc's default malloc thresholds vs freed memory kept in the heap.

    python benchmarks/bench_malloc.py [--steps 300] [--repeats 2] [--groups mlp_mixed,mlp_adam,vit_mixed]

Groups of 12 runs of ``configs/cpu.yaml``'s continual models (``bench_fused_step.py``: the MLP 3 × 128 and the tiny
ViT, 8×8 inputs, batch 32, fused Adam kernel): ``*_mixed`` holds 3 seeds each of Adam, Adam + L2 1e-3, AdamO λ 0.1
and AdamO λ 0.01 (an MLP pack of the preset's continual arm), ``mlp_adam`` 12 Adam runs. ``mallopt`` settings are
process-wide and cannot be undone, so each measurement is a fresh worker process (``--worker``), the two modes
alternating, ``--repeats`` times each; each worker prints the min and median of 5 timings of ``--steps`` steps.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

METHODS = {"mixed": [{"optimizer": "adam"}, {"optimizer": "adam", "weight_decay": 0.001},
                     {"optimizer": "adamo", "isometry_lambda": 0.1}, {"optimizer": "adamo", "isometry_lambda": 0.01}],
           "adam": [{"optimizer": "adam"}] * 4}


def worker(mode: str, group: str, steps: int) -> None:
    if mode == "kept":
        from adaptlab.jobstart import keep_freed_memory

        assert keep_freed_memory(), "keep_freed_memory needs glibc"
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fused_step import _model, _task, ms_per_step

    from adaptlab.config import train_config
    from adaptlab.train.fused import FusedRuns

    torch.set_num_threads(1)
    kind, methods = group.split("_")
    base = {"steps": steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 0, "min_lr_factor": 1.0, "clip_grad": None,
            "eval_every": steps, "ckpt_every": 0}
    cfgs = [train_config({**base, **m}, {"fused_adam": True}) for m in METHODS[methods] for _ in range(3)]
    cpu = torch.device("cpu")
    g = FusedRuns([_model(kind, s) for s in range(12)], [_task(s, cpu) for s in range(12)], [3e-3] * 12, cfgs[0], cpu,
                  run_cfgs=cfgs)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = sorted(ms_per_step(g, steps) for _ in range(5))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (5 * (steps + 10))  # +10 warm-up steps
    print(f"{group:10s} {mode:8s} {ms[0]:8.2f} {ms[2]:8.2f} {faults:10.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--groups", default="mlp_mixed,mlp_adam,vit_mixed")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "GROUP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.steps)
    print(f"{'group':10s} {'malloc':8s} {'min ms':>8s} {'med ms':>8s} {'faults/step':>10s}  (12 runs, 1 thread)")
    for group in args.groups.split(","):
        steps = args.steps if group.startswith("mlp") else max(args.steps // 5, 20)  # a ViT step is ~5x an MLP's
        for _ in range(args.repeats):
            for mode in ("default", "kept"):
                subprocess.run([sys.executable, __file__, "--worker", mode, group, "--steps", str(steps)], check=True)


if __name__ == "__main__":
    main()
