"""Steps/s of adaptlab's training loop vs a bare timm + torch loop on the same tiny model and batch size.

    python benchmarks/bench_loop.py [--steps 300] [--threads 2] [--repeats 3]

The bare loop is forward, cross-entropy, backward, optimizer step on a fixed batch. Ours adds what a real
run needs: per-step batch sampling and normalisation, the lr schedule, the finiteness check, grad-norm
clipping and logging (one small val split evaluated at the end). Runs alternate so drift hits both alike.
Target: ratio >= 0.95.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from adaptlab.config import train_config
from adaptlab.data.prepare import build_dataset
from adaptlab.models.vit import create_vit
from adaptlab.train.loop import fit
from adaptlab.train.tasks import ImageClassification

MODEL = {"timm_name": None, "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4,
         "mlp_ratio": 4.0}


def bare(steps: int, batch: int, n_classes: int) -> float:
    torch.manual_seed(0)
    model = create_vit(MODEL, n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, n_classes, (batch,))
    t = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t)


def ours(steps: int, batch: int, data) -> float:
    torch.manual_seed(0)
    model = create_vit(MODEL, data.num_classes)
    cfg = train_config({"steps": steps, "batch_size": batch, "eval_every": steps, "ckpt_every": 0, "lr": 0.01})
    task = ImageClassification(data, 32, torch.device("cpu"), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        return fit(model, task, cfg, tmp, device=torch.device("cpu"), config_id="bench").steps_per_second


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = build_dataset("bench", {"kind": "procedural", "classes": 10, "n_train": 2048, "n_val": 32, "n_test": 32})
    bare(20, args.batch, 10), ours(20, args.batch, data)  # warm-up
    b, o = [], []
    for _ in range(args.repeats):
        b.append(bare(args.steps, args.batch, 10))
        o.append(ours(args.steps, args.batch, data))
    mb, mo = statistics.median(b), statistics.median(o)
    print(f"bare timm+torch loop : {mb:7.2f} steps/s  (runs: {', '.join(f'{v:.2f}' for v in b)})")
    print(f"adaptlab fit()       : {mo:7.2f} steps/s  (runs: {', '.join(f'{v:.2f}' for v in o)})")
    print(f"ratio ours/bare      : {mo / mb:.3f}  (target >= 0.95; {args.steps} steps, batch {args.batch}, "
          f"{args.threads} threads, ViT d=64 depth=4 on 32x32/8)")


if __name__ == "__main__":
    main()
