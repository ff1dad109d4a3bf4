"""Time per training step of preconditioned attention vs timm's Attention, measured interleaved.

    python benchmarks/bench_precond.py [--steps 20] [--repeats 7] [--batch 64] [--threads 2]

Every repeat times `steps` steps (forward, backward, AdamW) of each arm in turn, rotating the order, so load
from other processes on a shared machine hits all arms alike (adaptlab.precond.run.time_arms, the same code
as the study's timing run). Prints median and spread per arm and the overhead vs the baseline. Goal: < 5 %.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from adaptlab.precond.run import time_arms

MODEL = {"timm_name": None, "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4,
         "mlp_ratio": 4.0}
ARMS = {"baseline": {"kind": "timm"}, "col": {"kind": "preconditioned", "form": "col"},
        "row": {"kind": "preconditioned", "form": "row"},
        "col_detached": {"kind": "preconditioned", "form": "col", "detach": True}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patch", type=int, default=MODEL["patch_size"], help="smaller patches = more tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = {**MODEL, "patch_size": args.patch}
    rows = time_arms(model, ARMS, batch_size=args.batch, steps=args.steps, repeats=args.repeats)
    per_arm = {a: [s for arm, _, s in rows if arm == a] for a in ARMS}
    base = statistics.median(per_arm["baseline"])
    tokens = (model["img_size"] // model["patch_size"]) ** 2 + 1
    print(f"ViT dim {model['embed_dim']} depth {model['depth']} heads {model['num_heads']}, {tokens} tokens, "
          f"batch {args.batch}, {args.threads} threads, {args.repeats} interleaved repeats of {args.steps} steps")
    print(f"{'arm':<14}{'median ms/step':>16}{'min':>9}{'max':>9}{'overhead':>11}")
    for arm, secs in per_arm.items():
        med = statistics.median(secs)
        print(f"{arm:<14}{1e3 * med:>16.2f}{1e3 * min(secs):>9.2f}{1e3 * max(secs):>9.2f}"
              f"{100 * (med / base - 1):>10.1f}%")
    spread = (max(per_arm['baseline']) - min(per_arm['baseline'])) / base
    print(f"noise: the baseline's own repeats spread over {100 * spread:.0f}% of its median")


if __name__ == "__main__":
    main()
