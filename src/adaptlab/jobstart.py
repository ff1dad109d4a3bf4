"""A job process's start: the training stack imported with Python's cyclic garbage collector off.

Every rule's training script calls ``start_job()`` first. While torch, torchvision and timm import (~500,000 objects,
no garbage) the collector runs ~940 times, each pass over the growing heap: 0.85 s of the 4.0 s that importing
``adaptlab.runner`` takes on a 2-core machine (``benchmarks/bench_jobstart.py``: 4.05 → 3.32 s, median of 5 fresh
processes). The imports run with it off; ``gc.freeze()`` then takes what they created out of the collections the
training loop triggers, which would otherwise rescan it. The collector is back on for the job's own work: runs
build and drop models, and a job must not grow without bound.

Tried and left out: glibc's ``mallopt`` thresholds that keep freed blocks in the heap. They remove the ~700 page
faults per step of a 12-run grouped ViT, but the step was no faster (30.8 vs 30.4 ms, median of 5).
"""
from __future__ import annotations

import gc
import importlib


def start_job(modules: tuple[str, ...] = ("adaptlab.runner",)) -> None:
    """Import ``modules`` (``adaptlab.runner`` brings in torch and timm) with the cyclic garbage collector off, then
    freeze everything alive out of it; a collector the caller had turned off stays off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
