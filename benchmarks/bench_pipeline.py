"""Wall time of the default pipeline from a clean results/ and of `snakemake -n` on the paper preset.

    python benchmarks/bench_pipeline.py [--skip-run]

The pipeline runs in a temporary copy of the workflow, so the repository's results/ is untouched.
Budget: the whole default pipeline <= 10 minutes on 2 cores once all studies are in (spine ≈ 2 minutes).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-run", action="store_true", help="only time the dry runs")
    args = ap.parse_args()
    sm = [sys.executable, "-m", "snakemake"]
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        for name in ("Snakefile", "config.yaml"):
            shutil.copy(REPO / name, wd / name)
        for name in ("rules", "workflow", "configs", "profiles"):
            shutil.copytree(REPO / name, wd / name)
        dry = timed(sm + ["-n", "--configfile", "configs/paper.yaml"], wd)
        print(f"snakemake -n, paper preset                    : {dry:6.1f} s")
        if (wd / "profiles/slurm").is_dir():
            dry_p = timed(sm + ["-n", "--profile", "profiles/slurm", "--configfile", "configs/paper.yaml"], wd)
            print(f"snakemake -n --profile slurm, paper preset    : {dry_p:6.1f} s")
        if not args.skip_run:
            run = timed(sm + ["--cores", "all"], wd)
            print(f"snakemake --cores all, default, clean results : {run:6.1f} s")
            noop = timed(sm + ["-n", "--cores", "all"], wd)
            print(f"snakemake -n after it (nothing to do)         : {noop:6.1f} s")


if __name__ == "__main__":
    main()
