"""What ``adaptlab.jobstart.start_job`` saves a job: its imports with the cyclic GC off, and timm left out where
the job's runs build no timm model.

    python benchmarks/bench_jobstart.py [--repeats 5]

Each measurement is a fresh process that imports ``adaptlab.runner`` and timm (torch, torchvision, timm) as a job
does, with Python's default collector (``defaults``) vs through ``start_job`` (``start_job``), and ``start_job`` for
a continual MLP pack (``mlp_job``: no timm), the three alternated so that all see the same machine: wall seconds,
and the seconds spent inside the collector (``gc.callbacks``).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

IMPORTS = r"""
import gc, sys, time
spent = [0.0, 0.0]
def on_gc(phase, info):
    if phase == "start":
        spent[1] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - spent[1]
gc.callbacks.append(on_gc)
t = time.perf_counter()
if sys.argv[1] == "start_job":
    from adaptlab.jobstart import start_job
    start_job()
elif sys.argv[1] == "mlp_job":
    from adaptlab.jobstart import start_job
    start_job([("continual_run", {"model": {"kind": "mlp"}})])
    assert "timm" not in sys.modules
else:
    import adaptlab.runner, timm
print(time.perf_counter() - t, spent[0])
"""


def _measure(code: str, *args: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    a, b = out.stdout.split()
    return float(a), float(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    modes = ("defaults", "start_job", "mlp_job")
    imports = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            imports[m].append(_measure(IMPORTS, m))
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    print(f"import adaptlab.runner and timm (mlp_job: no timm), median of {args.repeats} fresh processes:")
    for m in modes:
        print(f"  {m:10s} {med(imports[m], 0):5.2f} s, of which in the cyclic GC {med(imports[m], 1):5.2f} s")
    print(f"  saved: {med(imports['defaults'], 0) - med(imports['start_job'], 0):.2f} s per job, "
          f"{med(imports['defaults'], 0) - med(imports['mlp_job'], 0):.2f} s per MLP pack job")


if __name__ == "__main__":
    main()
