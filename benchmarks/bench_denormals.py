"""Seconds per ``configs/cpu.yaml`` continual run with denormal floats flushed to zero (what every run's process
does, ``adaptlab.train.device.set_cpu_math``) and without, in one invocation.

    python benchmarks/bench_denormals.py [--model mlp] [--method adam] [--benchmark rl_gauss] [--tasks 30]

Why it matters: a dead ReLU unit's gradient is exactly 0, so its Adam moments decay by β every step into the
denormal range, where x86 arithmetic takes a slow path. Printed: each mode's wall time, the ratio, and whether the
two runs' summaries agree (they should: a flushed value differs from its denormal by less than 1.2e-38).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import adaptlab.runner as runner
from adaptlab.config import load_config
from adaptlab.continual.run import run_continual
from adaptlab.records import read_summary
from adaptlab.studies import study

COLUMNS = ("status", "acc_first", "acc_last", "dead_frac_end", "final_loss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--method", default="adam")
    ap.add_argument("--benchmark", default="rl_gauss", help="rl_gauss, rl_digits or perm_digits")
    ap.add_argument("--tasks", type=int, default=30)
    args = ap.parse_args()
    specs = study("continual").specs(load_config("configs/cpu.yaml"))
    spec = next((s for s in specs.values() if s["model_name"] == args.model and s["method_name"] == args.method
                 and s["benchmark_name"] == args.benchmark), None)
    if spec is None:
        raise SystemExit(f"bench_denormals: no cpu.yaml continual run with model {args.model!r}, method "
                         f"{args.method!r}, benchmark {args.benchmark!r}")
    spec["grid_cfg"]["tasks"] = args.tasks
    flushing = runner.set_cpu_math

    def keep_denormals(n: int) -> None:
        flushing(n)
        torch.set_flush_denormal(False)

    results = {}
    try:
        for mode, setup in (("denormals kept", keep_denormals), ("flushed", flushing)):
            runner.set_cpu_math = setup
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                run_continual(spec, out)
                wall = time.perf_counter() - t
                row = read_summary(f"{out}/summary.parquet")
            results[mode] = (wall, {k: row.get(k) for k in COLUMNS})
            print(f"{mode:15s} {wall:7.2f} s  {results[mode][1]}", flush=True)
    finally:
        runner.set_cpu_math = flushing
    (kept, rec_kept), (flushed, rec_flushed) = results.values()
    print(f"{spec['run_id']}: flushed {kept / flushed:.2f}x faster; records equal: {rec_kept == rec_flushed}")


if __name__ == "__main__":
    main()
