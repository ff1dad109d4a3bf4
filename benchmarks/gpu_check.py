"""GPU readiness in one command: ViT-B/16 finetuning speed, MFU and memory of adaptlab's loop against a bare
timm + torch loop, and one tiny run of every study on the GPU. About 5 minutes at most; nothing is downloaded.

    python benchmarks/gpu_check.py                # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --cpu-smoke    # the same code path, tiny, on the CPU (tests/test_gpu_ready.py)

Without a CUDA device (and without --cpu-smoke) it prints one line saying so and exits 0. Exit 1 when a study
run or a measurement failed. Hand-written, because the point is to time *our* code path against the plainest one:

- bare: timm ViT-B/16 at 224 px (random init), bf16 autocast, cross-entropy, zero_grad, backward, AdamW (fused on
  CUDA) on one fixed batch in GPU memory; timed between two synchronisations after warm-up steps.
- fit: ``adaptlab.train.loop.fit`` with ``ImageClassification`` (what ``runner.run_finetune`` builds) on a
  synthetic in-memory dataset of 224-px uint8 images, same model, batch and optimizer: per-step batch sampling
  and normalisation, lr schedule, finiteness check, grad-norm clipping, logging. Timed between two synchronised
  ``on_step`` callbacks, so the one evaluation and the best-weights write at the last step are outside it.
- FLOPs of one training step (forward + backward) from ``torch.utils.flop_counter.FlopCounterMode`` on the
  eager model; MFU = FLOPs/step x steps/s / peak bf16 FLOP/s (``PEAK_BF16_TFLOPS`` by device name, or
  ``--peak-tflops``). Peak memory: ``torch.cuda.max_memory_allocated`` per measurement (fit's includes its
  uint8 dataset on the GPU).
- torch.compile (the ``train.compile`` option: ``adaptlab.train.device.compile_model``) of both loops, in a
  child process killed at the time budget, since compiling takes tens of seconds.
- studies: ``gpu_studies.run_all``, one tiny run of every registered study through its run function.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_studies, when imported from elsewhere

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a pattern of torch.cuda.get_device_name; first match wins.
PEAK_BF16_TFLOPS = (
    (r"H100 PCIe", 756.0), (r"H100 NVL", 835.0), (r"GH200|H200|H100|H800", 989.0), (r"B200", 2250.0),
    (r"A100|A800", 312.0), (r"L40S", 362.0), (r"L40", 181.0), (r"L4", 121.0), (r"A10", 125.0),
)
VIT_B16 = {"timm_name": "vit_base_patch16_224", "mean": [0.5] * 3, "std": [0.5] * 3}
TINY = {"timm_name": None, "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4,
        "mlp_ratio": 2.0, "mean": [0.5] * 3, "std": [0.5] * 3}
OPT = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05}


def peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"\b(?:{pattern})\b", device_name):
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def synthetic_data(img: int, n_classes: int, n_train: int, n_eval: int):
    """An in-memory ImageDataset of random uint8 images at the model's resolution (no resize in the loop)."""
    from adaptlab.data.store import ImageDataset

    rng = np.random.default_rng(0)
    split = lambda n: (rng.integers(0, 256, (n, img, img, 3), dtype=np.uint8),  # noqa: E731
                       rng.integers(0, n_classes, n).astype(np.int64))
    (xt, yt), (xv, yv), (xs, ys) = split(n_train), split(n_eval), split(n_eval)
    return ImageDataset("synthetic", n_classes, xt, yt, xv, yv, xs, ys)


def _count_cpu_attention() -> None:
    """FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash kernel that
    F.scaled_dot_product_attention runs on the CPU: register the same formulas for it (CPU smoke runs)."""
    from torch.utils import flop_counter as fc

    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None or fwd in fc.flop_registry:
        return
    fc.register_flop_formula(fwd)(lambda q, k, v, *_, out_shape=None, **__: fc.sdpa_flop_count(q, k, v))
    fc.register_flop_formula(bwd)(lambda g, q, k, v, *_, out_shape=None, **__: fc.sdpa_backward_flop_count(g, q, k, v))


def step_flops(model, x, y, device) -> int:
    """FLOPs of one forward + backward of the eager model (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from adaptlab.train.device import autocast

    _count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure_bare(model_cfg, n_classes, batch, steps, warmup, device, compile_: bool) -> dict:
    from adaptlab.models.vit import create_vit
    from adaptlab.train.device import autocast, compile_model

    torch.manual_seed(0)
    model = create_vit(model_cfg, n_classes).to(device).train()
    img = model.patch_embed.img_size[0]
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, n_classes, (batch,), device=device)
    flops = step_flops(model, x, y, device)
    if compile_:
        compile_model(model)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=OPT["lr"], weight_decay=OPT["weight_decay"], **fused)
    reset_memory(device)

    def step():
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return {"steps_per_s": steps / (time.perf_counter() - t), "flops": flops, "mem_gib": peak_memory_gib(device),
            "optimizer": f"AdamW{' (fused)' if fused else ''}"}


def measure_fit(model_cfg, n_classes, batch, steps, warmup, device, compile_: bool) -> dict:
    from adaptlab.config import train_config
    from adaptlab.models.vit import create_vit
    from adaptlab.train.device import compile_model
    from adaptlab.train.loop import fit
    from adaptlab.train.optim import build_optimizer
    from adaptlab.train.tasks import ImageClassification

    torch.manual_seed(0)
    model = create_vit(model_cfg, n_classes)
    img = model.patch_embed.img_size[0]
    data = synthetic_data(img, n_classes, n_train=4 * batch, n_eval=batch)
    total = warmup + steps + 1  # the last step evaluates and writes best weights: outside the timed window
    cfg = train_config({**OPT, "steps": total, "batch_size": batch, "eval_batch_size": batch, "eval_every": total,
                        "ckpt_every": 0, "compile": compile_})
    opt_name = type(build_optimizer(model.to(device).named_parameters(), cfg)).__name__
    fused = bool(build_optimizer(model.named_parameters(), cfg).defaults.get("fused"))
    if compile_:  # what fit does for train.compile (compile_model); idempotent if fit does it as well
        compile_model(model)
    task = ImageClassification(data, img, device, seed=0, mean=model_cfg["mean"], std=model_cfg["std"],
                               eval_batch_size=batch)
    reset_memory(device)
    marks: dict[int, float] = {}

    def on_step(done: int) -> None:
        if done in (warmup, warmup + steps):
            sync(device)
            marks[done] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        result = fit(model, task, cfg, tmp, device=device, config_id="gpu_check", on_step=on_step)
    if result.status != "ok":
        raise RuntimeError(f"fit ended {result.status!r} (final loss {result.final_loss})")
    return {"steps_per_s": steps / (marks[warmup + steps] - marks[warmup]), "mem_gib": peak_memory_gib(device),
            "optimizer": f"{opt_name}{' (fused)' if fused else ''}"}


def report(label: str, r: dict, flops: int, peak: float | None, batch: int) -> str:
    mfu = f"{100 * flops * r['steps_per_s'] / (peak * 1e12):5.1f} %" if peak else "    n/a"
    mem = f"{r['mem_gib']:6.2f} GiB" if r["mem_gib"] is not None else "     n/a"
    return f"  {label:<28}{r['steps_per_s']:9.2f}{r['steps_per_s'] * batch:10.1f}   {mfu}   {mem}   {r['optimizer']}"


def compare(args, device: torch.device, model_cfg: dict, compile_: bool) -> None:
    """Bare loop and fit, eager or compiled: one line each and their ratio."""
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    tag = " + torch.compile" if compile_ else ""
    bare = measure_bare(model_cfg, args.classes, args.batch, args.steps, args.warmup, device, compile_)
    if not compile_:
        print(f"FLOPs per training step (FlopCounterMode, forward + backward): {bare['flops'] / 1e9:,.4g} GFLOP")
        print(f"  {'loop':<28}{'steps/s':>9}{'images/s':>10}   {'MFU':>7}   {'peak mem':>10}   optimizer")
    print(report(f"bare timm+torch{tag}", bare, bare["flops"], peak, args.batch), flush=True)
    ours = measure_fit(model_cfg, args.classes, args.batch, args.steps, args.warmup, device, compile_)
    print(report(f"adaptlab fit(){tag}", ours, bare["flops"], peak, args.batch))
    print(f"  {'ratio fit/bare' + tag:<28}{ours['steps_per_s'] / bare['steps_per_s']:9.3f}   (target >= 0.95)", flush=True)


def header(args, device: torch.device, model_name: str, img: int) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    src = "--peak-tflops" if args.peak_tflops else "table"
    print(f"gpu_check: torch {torch.__version__}, device {device} ({name}), peak bf16 "
          + (f"{peak:g} TFLOP/s ({src})" if peak else "unknown (MFU n/a; pass --peak-tflops)"))
    print(f"{model_name} at {img} px, random init, synthetic data in memory, batch {args.batch}, {args.classes} "
          f"classes, {'bf16 autocast' if device.type == 'cuda' else 'fp32 (bf16 autocast is CUDA only)'}, AdamW lr "
          f"{OPT['lr']}; {args.steps} timed steps after {args.warmup}")


def child_compile(argv: list[str], budget_s: float) -> bool:
    """The compiled comparison in a child process, killed at ``budget_s``."""
    if budget_s < 20:
        print(f"  torch.compile: skipped, {budget_s:.0f} s left of the time budget")
        return True
    cmd = [sys.executable, __file__, "--part", "compile", *argv]
    sys.stdout.flush()
    try:
        proc = subprocess.run(cmd, timeout=budget_s)
    except subprocess.TimeoutExpired:
        print(f"  torch.compile: stopped at the time budget ({budget_s:.0f} s left when it started)")
        return True  # slow compilation is a finding, not a failure
    if proc.returncode != 0:
        print(f"  torch.compile: FAILED (exit {proc.returncode}, traceback above)")
    return proc.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU needed: a tiny ViT and the studies on the CPU")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (GPU), 16 (--cpu-smoke)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps, default 50 (GPU), 3 (--cpu-smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first, default 10 (GPU), 1 (--cpu-smoke)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (overrides the table)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time both loops under torch.compile (default: on with a GPU, off with --cpu-smoke)")
    ap.add_argument("--no-studies", dest="studies", action="store_false", help="skip the tiny study runs")
    ap.add_argument("--budget-s", type=float, default=300.0, help="total time budget; compile is cut off at it")
    ap.add_argument("--part", choices=["all", "compile"], default="all", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"gpu_check: no CUDA GPU available (torch {torch.__version__}, torch.cuda.is_available() is False); "
              f"nothing measured. Run it on a GPU machine, or with --cpu-smoke to exercise it on the CPU.")
        return 0
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    smoke = args.cpu_smoke
    args.batch = args.batch or (16 if smoke else 128)
    args.steps = args.steps or (3 if smoke else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    if smoke:
        args.classes = min(args.classes, 10)
    model_cfg, model_name = (TINY, "tiny ViT (d=64, depth 2, patch 8)") if smoke else (VIT_B16, "ViT-B/16")
    if args.part == "compile":
        compare(args, device, model_cfg, compile_=True)
        return 0
    ok = True
    header(args, device, model_name, model_cfg.get("img_size") or 224)
    try:
        compare(args, device, model_cfg, compile_=False)
    except Exception as err:  # noqa: BLE001 - report, go on with the studies
        print(f"  throughput: FAILED {type(err).__name__}: {err}")
        ok = False
    results = {}
    if args.studies:
        print(f"studies: one tiny run each on {device}")
        with tempfile.TemporaryDirectory() as tmp:
            from gpu_studies import run_all

            results = run_all(Path(tmp), device.type)
        ok = ok and all(results.values())
    if args.compile if args.compile is not None else not smoke:
        ok = child_compile(argv, args.budget_s - (time.perf_counter() - t0) - 5) and ok
    summary = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1), "studies": results}
    print(f"gpu_check: {'ok' if ok else 'FAILED'} in {summary['seconds']} s  {json.dumps(summary['studies'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
