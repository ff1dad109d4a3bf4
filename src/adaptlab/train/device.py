"""Device resolution: ``auto`` picks CUDA with bf16 autocast when a GPU is present, else the CPU."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))
