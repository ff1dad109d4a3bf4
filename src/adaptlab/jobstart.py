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

Freed memory stays in the process (``keep_freed_memory``, glibc's ``mallopt``). By default glibc serves blocks
from 128 KiB up from fresh ``mmap`` pages and gives the top of its heap back to the kernel, so a training step's
tensors, freed and allocated again every step, fault their pages in again: ~620 page faults per step of a 12-run
continual MLP group with AdamO runs, whose isometry step allocates (12, 128, 128) Grams. With the blocks kept in the
heap a step of that group takes 5.9-7.0 ms instead of 8.5-8.8 (min of 5 timings, two workers each,
``benchmarks/bench_malloc.py``); a 12-run ViT group 26.8-27.1 ms instead of 28.3-30.1, and 12 Adam-only MLP runs,
which allocate less, about the same. The price: a job's resident memory does not shrink after its peak, which a job
that holds one pack's tensors can afford.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import os
from typing import Iterable


def start_job(runs: Iterable[tuple[str, dict | None]] | None = None) -> None:
    """Import the training stack (``adaptlab.runner``: torch) and timm with the cyclic garbage collector off, then
    freeze everything alive out of it; a collector the caller had turned off stays off. ``runs``: the job's
    (rule, spec) pairs; timm is left out when each run's study says it builds no timm model (``imports_timm``)."""
    from adaptlab.studies import imports_timm

    keep_freed_memory()
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


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB (glibc's largest mmap threshold) from the heap, never trim it, and grow it 64 MiB at a
    time: freed tensors' pages are reused, not faulted in again (module docstring). True when set; False where the
    C library is not glibc (nothing changes there)."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):  # no such confstr name, no libc.so.6, no os.confstr
        return False
    return all([libc.mallopt(M_MMAP_THRESHOLD, 32 << 20), libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1),
                libc.mallopt(M_TOP_PAD, 64 << 20)])
