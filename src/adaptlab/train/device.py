"""Device resolution and the GPU switches of the training loop.

``auto`` picks CUDA with bf16 autocast when torch sees a GPU, else the CPU, with one exception written by hand
here: a job that was *given* a GPU (by SLURM, or by whoever set ``CUDA_VISIBLE_DEVICES``) but whose torch sees
none fails, naming the variable and its value. torch has no such check: a CPU-only wheel, a driver older than
the wheel's CUDA or a container without the device files would otherwise make a cluster job train on the CPU,
silently and two orders of magnitude slower, and record CPU runs as if nothing happened. Which variables mean
"given a GPU" is SLURM's and CUDA's convention (``GPU_ENV_VARS``). ``device: cpu`` stays allowed anywhere.

``train.precision`` (``uses_bf16``) says where the forward runs under bf16 autocast: CUDA only by default, or on
the CPU too (``bf16``), where oneDNN multiplies bf16 at ~4x MKL's float32 rate on this repo's 2-core machines
(AVX512-BF16: 396-494 against 94-110 GFLOP/s for the preset's shapes, benchmarks/bench_fused_preset.py
``--precision``; oneDNN's own float32 kernel does ~2x MKL here, ``onednn_float32_matmul``).

``compile_model`` is ``nn.Module.compile`` (in place, so parameter names, checkpoints and ``state_dict`` keys
stay those of the eager model); the loop applies it when a run's ``train.compile`` is true.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

# Variables that say a job was given GPUs. SLURM_GPUS / SLURM_GPUS_ON_NODE are counts ("1", "a100:2"; "0" =
# none); SLURM_JOB_GPUS / SLURM_STEP_GPUS / CUDA_VISIBLE_DEVICES list device indices or UUIDs ("0" is GPU 0).
GPU_COUNT_VARS = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE")
GPU_LIST_VARS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")
GPU_ENV_VARS = GPU_COUNT_VARS + GPU_LIST_VARS
NO_GPU_VALUES = {"", "-1", "nodevfiles", "none", "n/a"}  # CUDA's and SLURM's spellings of "no device"


def _count_says_gpu(value: str) -> bool:
    """A SLURM GPU count ("2", "a100:2", "a100:1,v100:0") names at least one GPU."""
    for part in value.split(","):
        count = part.rsplit(":", 1)[-1].strip()
        if not count.isdigit() or int(count) > 0:  # an unparsable count is taken as a request, not ignored
            return True
    return False


def _list_says_gpu(value: str) -> bool:
    """A device list ("0", "0,1", "GPU-<uuid>") names a device; CUDA stops at the first invalid entry ("-1")."""
    first = value.split(",")[0].strip()
    return first.lower() not in NO_GPU_VALUES and not first.startswith("-")


def gpu_assignment(env: dict | None = None) -> tuple[str, str] | None:
    """(variable, value) of the first environment variable that says this job was given a GPU, else None."""
    env = os.environ if env is None else env
    for var in GPU_ENV_VARS:
        value = env.get(var)
        if value is None or value.strip().lower() in NO_GPU_VALUES:
            continue
        if (_count_says_gpu if var in GPU_COUNT_VARS else _list_says_gpu)(value.strip()):
            return var, value
    return None


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but torch.cuda.device_count() is "
            f"{torch.cuda.device_count()}: no driver, a driver too old for that CUDA, or the device not visible here")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of ``device:`` ``auto`` | ``cpu`` | ``cuda``; see the module docstring for ``auto``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        given = gpu_assignment()
        if given is not None:
            var, value = given
            raise RuntimeError(
                f"device: auto, and this job was given a GPU ({var}={value!r}), but no CUDA device is usable: "
                f"{_why_no_cuda()}. Refusing to train on the CPU instead. Fix the CUDA set-up (torch wheel, driver, "
                f"container), or set `device: cpu` to train on the CPU on purpose.")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: 'cuda' requested but no CUDA device is available ({_why_no_cuda()})")
    return torch.device(name)


PRECISIONS = ("auto", "bf16", "fp32")


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether a run's forward runs under bf16 autocast: ``train.precision`` ``auto`` (left out) = on CUDA only,
    ``bf16`` = on any device, ``fp32`` = never."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: {precision!r} is not one of {list(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto"):
    """The forward's autocast context (``uses_bf16``); weights, optimizer state and gradients stay float32."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def explicit_attention(model: torch.nn.Module) -> None:
    """timm's attention layers (and ours that follow their ``fused_attn`` flag) compute softmax(q kᵀ) v explicitly
    instead of calling ``scaled_dot_product_attention``: the same function."""
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False


def explicit_attention_for_cpu_bf16(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """Under CPU bf16, ``explicit_attention``: torch's CPU flash-attention backward in bf16 took 11 ms a call for
    the preset's 17-token ViT (64 sequences, 4 blocks), 78 % of a 57 ms step that takes 11-13 ms with the explicit
    matmul + softmax. Float32 and CUDA keep the fused kernel."""
    if device.type == "cpu" and uses_bf16(device, precision):
        explicit_attention(model)


@contextlib.contextmanager
def onednn_float32_matmul(device: torch.device):
    """Float32 matmuls (``mm``, ``bmm``, ``addmm``, ``baddbmm``) on the CPU go to oneDNN instead of MKL while the
    context is open, where that keeps them float32 (``onednn_float32_is_exact``); elsewhere, and on other devices,
    nothing changes. A fused group's step runs under it (``train.fused``).

    Why: this repo's machines are AMD EPYC cores with AVX-512, where MKL's float32 GEMM takes a path at about half
    the rate of oneDNN's AVX-512 brgemm kernel (the preset continual group's shapes: a 18 × 512×32 by 32×96 ``bmm``
    522-575 µs against 246-259 µs; ``benchmarks/bench_fused_step.py --matmul onednn,mkl``). torch routes float32 matmuls to
    oneDNN only under ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, which *allows* oneDNN to multiply
    in bf16; on a CPU without AMX its brgemm kernel stays float32 (``brg_matmul:avx512_core``, errors of float32
    size), so results change only at float32 rounding (another summation order), as with ``fused_adam``.

    Scoped, not process-wide: under the same switch torch's CPU flash attention (``scaled_dot_product_attention``)
    took 15 ms a call instead of 0.7 for a 64-wide timm ViT, and a run's own model (evaluation, a run alone) keeps
    that kernel. A fused group's step has no such call (its attention is explicit ``bmm``: ``train.grouped``, or
    ``explicit_attention`` under vmap); the grouped attention's own products go back to MKL inside it
    (``default_float32_matmul``)."""
    if device.type != "cpu" or not onednn_float32_is_exact():
        yield
        return
    with _onednn_switch("bf16"):
        yield


@contextlib.contextmanager
def default_float32_matmul():
    """torch's default routing of float32 matmuls (MKL on the CPU) while open, also inside ``onednn_float32_matmul``.

    Why: oneDNN wins on a group's Linear products, but the grouped attention's are hundreds of 16 × 16 matrices per
    ``bmm`` (one per run, input and head, fed as strided views), where its per-call and per-matrix cost outweighs the
    faster kernel: an 18-run continual ViT group's step took 18.2-19.8 ms with its attention on MKL against
    19.7-20.1 ms on oneDNN (the other products on oneDNN in both; four alternations in one process)."""
    if not onednn_float32_is_exact():  # the switch is never on (or does not exist in this torch)
        yield
        return
    with _onednn_switch("none"):  # "none": torch's default value of the switch
        yield


@contextlib.contextmanager
def _onednn_switch(value: str):
    """torch's switch that routes float32 matmuls to oneDNN (``"bf16"``: and allows it bf16) or not (``"none"``),
    restored on leaving."""
    matmul = torch.backends.mkldnn.matmul
    before, matmul.fp32_precision = matmul.fp32_precision, value
    try:
        yield
    finally:
        matmul.fp32_precision = before


@functools.lru_cache(maxsize=1)
def onednn_float32_is_exact() -> bool:
    """Whether float32 products routed to oneDNN (``onednn_float32_matmul``) stay float32 on this CPU: the switch
    exists in this torch, the CPU has no AMX tiles (where oneDNN may take bf16 for them) and a probe of ``bmm`` and
    ``mm`` shapes like a fused group's (inner sizes 32 to 512) is within float32 rounding of float64 (relative
    error < 1e-5 of the largest entry; bf16 products miss it by ~300×). Checked once per process."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision") or not torch.backends.mkldnn.is_available():
        return False
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return False
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(6, 96, 32, generator=g), torch.randn(6, 32, 48, generator=g)),
             (torch.randn(6, 48, 512, generator=g), torch.randn(6, 512, 32, generator=g)),
             (torch.randn(192, 128, generator=g), torch.randn(128, 128, generator=g))]
    with _onednn_switch("bf16"):
        products = [a @ b for a, b in pairs]
    for (a, b), out in zip(pairs, products):
        want = a.double() @ b.double()
        if (out.double() - want).abs().max() > 1e-5 * want.abs().max():
            return False
    return True


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` ``model`` in place (``nn.Module.compile``); compiling an already compiled module is a no-op.

    In place rather than ``torch.compile(model)``: the wrapper that returns prefixes every ``state_dict`` key with
    ``_orig_mod.``, which would change checkpoints and best-weight files; here only ``model(...)`` changes.
    """
    if getattr(model, "_compiled_call_impl", None) is None:
        model.compile()
    return model


def set_cpu_math(n: int) -> None:
    """The CPU math of a run's process: ``n`` threads, and denormal floats flushed to zero.

    Flushing: a dead ReLU unit's gradient is exactly 0, so its Adam moments decay by β each step into the denormal
    range (below 1.2e-38), where x86 arithmetic takes a slow path; the preset's continual MLP (63 % dead units at
    the end) spent a quarter of its run there (12.3 s a run, 9.3 s flushed, the same records). A flushed value
    differs from its denormal by less than 1.2e-38, so results change at most in that range."""
    torch.set_num_threads(max(1, int(n)))
    torch.set_flush_denormal(True)
