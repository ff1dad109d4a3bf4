"""Milliseconds per training step and run: one continual run alone vs its seeds fused (``train.fused.FusedRuns``).

    python benchmarks/bench_fused_step.py [--steps 300] [--groups 3,6,11] [--models mlp,vit] [--device cpu] [--bf16]
        [--optimizer adam|adamo] [--matmul onednn,mkl] [--rounds 3]

The models are ``configs/cpu.yaml``'s continual MLP (3 × 128, 64 inputs) and tiny ViT (width 32, 2 blocks, 16
tokens of 2×2 pixels) on 8×8 single-channel inputs with 10 random labels, the preset's batch (32) and fused Adam
kernel (``fused_adam``), Adam at lr 3e-3, each step
through the loop's own group methods (set_lr, the vmapped loss with online accuracy, backward and grad norm, the
optimizer step): what ``fit`` does per step, without evaluation or logging. Printed: ms per step for the group
and per run, and the per-run speed-up over the run alone, all measured in this one invocation. ``--bf16`` times
every step (the run alone's too) under the CPU's bf16 autocast: not what a CPU run trains with (it changes the
numerics), a measure of what lower precision would buy here. ``--optimizer adamo`` steps AdamO (λ 0.01: the
isometry step's Gram and product per matrix). ``--matmul onednn,mkl`` times each group both ways, alternating
over ``--rounds`` (the best of each printed): the group's step with its float32 matmuls on oneDNN
(``adaptlab.train.device.onednn_float32_matmul``, what a fused group does) and on MKL (torch's default).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch

from adaptlab.config import train_config
from adaptlab.jobstart import keep_freed_memory
from adaptlab.continual.bench import ContinualTask, build_model
from adaptlab.train import fused
from adaptlab.train.device import onednn_float32_is_exact
from adaptlab.train.fused import FusedRuns
from adaptlab.train.loop import OneRun

MODELS = {"mlp": {"kind": "mlp", "width": 128, "depth": 3},
          "vit": {"kind": "vit", "width": 32, "depth": 2, "num_heads": 2, "patch_size": 2, "mlp_ratio": 2.0}}


def _task(seed: int, device) -> ContinualTask:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(512, 64, generator=g), torch.randint(10, (512,), generator=g)
    return ContinualTask(x.to(device), y.to(device), None, seed, 0, image_side=8)


def _model(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(MODELS[kind], 64, 8, 10)


def ms_per_step(group, steps: int, batch: int = 32, bf16: bool = False) -> float:
    def step(s: int) -> None:
        group.set_lr(1.0)
        # an outer autocast reaches the loop's forward (on the CPU the loop's own context is a no-op)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, values = group.losses(s, batch)
        group.backward_clip(loss, values, math.inf)
        group.step([True] * group.n)

    for s in range(10):  # warm-up
        step(s)
    if group.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(steps):
        step(s)
    if group.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def timed(group, args, matmul: str) -> float:
    """ms per step of ``group`` with its float32 matmuls on ``matmul`` (onednn: the group's own choice)."""
    own = fused.onednn_float32_matmul
    if matmul == "mkl":
        fused.onednn_float32_matmul = lambda device: contextlib.nullcontext()
    try:
        return ms_per_step(group, args.steps, args.batch, args.bf16)
    finally:
        fused.onednn_float32_matmul = own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--groups", default="3,6,11", help="fused group sizes (runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default=",".join(MODELS), help="which of " + ", ".join(MODELS))
    ap.add_argument("--bf16", action="store_true", help="every step under the CPU's bf16 autocast")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adamo"])
    ap.add_argument("--matmul", default="onednn", help="onednn (a fused group's float32 matmuls), mkl, or both")
    ap.add_argument("--rounds", type=int, default=1, help="timings of each group per matmul, alternating")
    args = ap.parse_args()
    keep_freed_memory()  # as every job does (adaptlab.jobstart): oneDNN's scratchpads are then not faulted in again
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    iso = {"isometry_lambda": 0.01} if args.optimizer == "adamo" else {}
    cfg = train_config({"optimizer": args.optimizer, "lr": 3e-3, "weight_decay": 0.0, "clip_grad": None,
                        "steps": args.steps, "batch_size": args.batch, "warmup_steps": 0, "min_lr_factor": 1.0,
                        "fused_adam": True, **iso})
    matmuls = args.matmul.split(",")
    print(f"{'model':5s} {'runs':>4s} {'matmul':>6s} {'ms/step':>8s} {'ms/step/run':>12s} {'speed-up':>9s}  ({device}, "
          f"{args.threads} thread(s), {args.optimizer}{', bf16 autocast' if args.bf16 else ''}; oneDNN keeps "
          f"float32 here: {onednn_float32_is_exact()})")
    for kind in args.models.split(","):
        alone = ms_per_step(OneRun(_model(kind, 0), _task(0, device), cfg, device), args.steps, args.batch,
                            args.bf16)
        print(f"{kind:5s} {1:4d} {'-':>6s} {alone:8.3f} {alone:12.3f} {1.0:8.2f}x", flush=True)
        for n in map(int, args.groups.split(",")):
            group = FusedRuns([_model(kind, s) for s in range(n)], [_task(s, device) for s in range(n)],
                              [3e-3] * n, cfg, device)
            best = dict.fromkeys(matmuls, math.inf)
            for _ in range(args.rounds):  # alternating, so that a drift of the machine's speed hits both alike
                for m in matmuls:
                    best[m] = min(best[m], timed(group, args, m))
            for m in matmuls:
                ms = best[m]
                print(f"{kind:5s} {n:4d} {m:>6s} {ms:8.3f} {ms / n:12.3f} {alone / (ms / n):8.2f}x", flush=True)
            if len(matmuls) > 1:
                print(f"{'':5s} {'':4s} {matmuls[-1]}/{matmuls[0]} = {best[matmuls[-1]] / best[matmuls[0]]:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
