"""A job process's start: the training stack imported with Python's cyclic garbage collector off.

Every rule's training script calls ``start_job()`` first. While torch, torchvision and timm import (~500,000 objects,
no garbage) the collector runs ~940 times, each pass over the growing heap: 0.85 s of the 4.0 s that importing
``adaptlab.runner`` takes on a 2-core machine (``benchmarks/bench_jobstart.py``: 4.05 → 3.32 s, median of 5 fresh
processes). The imports run with it off; ``gc.freeze()`` then takes what they created out of the collections the
training loop triggers, which would otherwise rescan it. The collector is back on for the job's own work: runs
build and drop models, and a job must not grow without bound.

A job whose runs build no timm model (a continual MLP pack: ``adaptlab.continual.imports_timm``) does not import
timm, torchvision and the parts of torch they pull in (torch._dynamo): ~1.5 s of its start. Nothing on the path
from ``adaptlab.runner`` to such a run imports them at module level (``adaptlab.models`` loads its names lazily).

Tried and left out: glibc's ``mallopt`` thresholds that keep freed blocks in the heap. They remove the ~700 page
faults per step of a 12-run grouped ViT, but the step was no faster (30.8 vs 30.4 ms, median of 5).
"""
from __future__ import annotations

import gc
import importlib
from typing import Iterable


def start_job(runs: Iterable[tuple[str, dict | None]] | None = None) -> None:
    """Import the training stack (``adaptlab.runner``: torch) and timm with the cyclic garbage collector off, then
    freeze everything alive out of it; a collector the caller had turned off stays off. ``runs``: the job's
    (rule, spec) pairs; timm is left out when each run's study says it builds no timm model (``imports_timm``)."""
    from adaptlab.studies import imports_timm

    enabled = gc.isenabled()
    gc.disable()
    try:
        importlib.import_module("adaptlab.runner")
        if runs is None or any(imports_timm(rule, spec) for rule, spec in runs):
            importlib.import_module("timm")
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
