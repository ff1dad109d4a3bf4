"""GPU readiness without a GPU: a job given a GPU that torch cannot see fails loudly, the GPU-only speed switches
leave CPU runs unchanged, and benchmarks/gpu_check.py and gpu_packs.py run (tiny, on the CPU) and say when there is
no GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from adaptlab.config import train_config
from adaptlab.train.device import GPU_ENV_VARS, compile_model, gpu_assignment, resolve_device
from adaptlab.train.optim import _fused, build_optimizer

from conftest import REPO

without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


@pytest.fixture
def no_gpu_env(monkeypatch):
    for var in GPU_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("var, value", [
    ("SLURM_GPUS", "1"), ("SLURM_GPUS", "a100:2"), ("SLURM_GPUS_ON_NODE", "4"), ("SLURM_JOB_GPUS", "0"),
    ("SLURM_STEP_GPUS", "2,3"), ("CUDA_VISIBLE_DEVICES", "0"), ("CUDA_VISIBLE_DEVICES", "GPU-8f3c2a"),
])
@without_cuda
def test_auto_fails_when_the_job_was_given_a_gpu_torch_cannot_see(no_gpu_env, var, value):
    no_gpu_env.setenv(var, value)
    assert gpu_assignment() == (var, value)
    with pytest.raises(RuntimeError) as err:
        resolve_device("auto")
    msg = str(err.value)
    assert f"{var}={value!r}" in msg and "no CUDA device is usable" in msg and "set `device: cpu`" in msg
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit CPU stays allowed, e.g. fake SLURM jobs


@pytest.mark.parametrize("var, value", [
    ("CUDA_VISIBLE_DEVICES", ""), ("CUDA_VISIBLE_DEVICES", "-1"), ("CUDA_VISIBLE_DEVICES", "NoDevFiles"),
    ("SLURM_GPUS", "0"), ("SLURM_GPUS_ON_NODE", "0"), ("SLURM_GPUS", "a100:0"), ("SLURM_JOB_GPUS", ""),
])
@without_cuda
def test_auto_is_the_cpu_when_no_gpu_was_given(no_gpu_env, var, value):
    no_gpu_env.setenv(var, value)
    assert gpu_assignment() is None
    assert resolve_device("auto") == torch.device("cpu")


@without_cuda
def test_error_skips_variables_that_say_none_and_explains_a_cuda_build(no_gpu_env):
    no_gpu_env.setenv("CUDA_VISIBLE_DEVICES", "-1")  # says "none": not the reason
    no_gpu_env.setenv("SLURM_JOB_GPUS", "1")
    no_gpu_env.setattr(torch.version, "cuda", "12.4")  # a CUDA wheel on a node whose driver it cannot use
    with pytest.raises(RuntimeError, match=r"SLURM_JOB_GPUS='1'.*built for CUDA 12\.4.*device_count\(\) is 0"):
        resolve_device("auto")
    no_gpu_env.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match=r"SLURM_JOB_GPUS='1'.*is a CPU-only build"):
        resolve_device("auto")
    with pytest.raises(RuntimeError, match=r"device: 'cuda' requested but no CUDA device is available \(.*CPU-only"):
        resolve_device("cuda")


def test_fused_adam_kernel_for_cuda_parameters_or_on_request():
    def fake(device, floating=True):
        return SimpleNamespace(is_cuda=device.startswith("cuda"), is_floating_point=lambda: floating,
                               device=torch.device(device))

    cuda, cpu = fake("cuda:0"), fake("cpu")
    off, on = train_config({}), train_config({"fused_adam": True})
    assert _fused([cuda, cuda], off) == {"fused": True} and _fused([{"params": [cuda]}], off) == {"fused": True}
    assert _fused([cuda, cpu], off) == {} and _fused([cuda, cpu], on) == {} and _fused([], on) == {}
    assert _fused([cuda, fake("cuda:1")], off) == {}  # one device per fused call
    assert _fused([cpu], off) == {}  # CPU: torch's default per-tensor loop unless asked
    assert _fused([cpu, {"params": [cpu]}], on) == {"fused": True} and _fused([fake("cpu", False)], on) == {}
    model = torch.nn.Linear(4, 3)
    for name in ("adam", "adamw", "adamo"):
        opt = build_optimizer(model.named_parameters(), train_config({"optimizer": name}))
        assert not any(g.get("fused") for g in opt.param_groups)  # CPU: torch's default implementation, as before


def _train(compiled: bool, steps: int = 3) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    if compiled:
        model.compile = lambda **kw: torch.nn.Module.compile(model, backend="aot_eager")  # no C++ build here
        assert compile_model(model) is model and compile_model(model) is model  # in place, idempotent
    opt = build_optimizer(model.named_parameters(), train_config({"optimizer": "adamw", "lr": 1e-2}))
    x, y, losses = torch.randn(32, 8), torch.randint(0, 3, (32,)), []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_compile_model_is_in_place_and_keeps_state_dict_keys():
    eager, eager_losses = _train(compiled=False)
    compiled, compiled_losses = _train(compiled=True)
    assert compiled._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in GPU_ENV_VARS}
    return subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)


@without_cuda
def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    proc = _gpu_check()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [proc.stdout.strip()]  # one line
    assert "no CUDA GPU available" in proc.stdout and "--cpu-smoke" in proc.stdout


def test_gpu_check_cpu_smoke_runs_both_loops_and_every_study():
    from adaptlab.studies import study_sections

    proc = _gpu_check("--cpu-smoke", "--peak-tflops", "0.01", "--steps", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    gflop = float(out.split("forward + backward): ")[1].split()[0].replace(",", ""))
    assert 0.05 < gflop < 0.5  # 3 x the forward of the tiny ViT at batch 16, attention included
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    for loop in ("bare timm+torch", "adaptlab fit()"):
        steps_per_s, images_per_s, mfu = map(float, lines[loop].split()[len(loop.split()):][:3])
        assert steps_per_s > 0 and images_per_s == pytest.approx(16 * steps_per_s, rel=0.01, abs=0.1)
        # MFU = FLOPs per step x steps/s / the --peak-tflops override
        assert mfu == pytest.approx(100 * gflop * 1e9 * steps_per_s / 0.01e12, rel=0.02, abs=0.1)
    for section in study_sections():
        assert any(line.split()[:2] == [section, "ok"] for line in out.splitlines()), (section, out)
    assert out.strip().splitlines()[-1].startswith("gpu_check: ok")


def test_a_failing_study_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_studies

    def broken(pipe):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_studies.STUDY_RUNS, "precond", broken)
    monkeypatch.setitem(gpu_studies.STUDY_RUNS, "peft", lambda pipe: [])  # a study that made no run fails too
    lines: list[str] = []
    results = gpu_studies.run_all(tmp_path, "cpu", say=lines.append)
    assert results == {"plasticity": True, "precond": False, "peft": False, "icl": True, "continual": True}
    assert any(line.split()[:2] == ["precond", "FAILED"] and "illegal memory access" in line for line in lines)


def test_gpu_packs_times_each_mode_in_its_own_processes_and_compares_the_records():
    """benchmarks/gpu_packs.py on the CPU, tiny: one run per process, the pack and the fused pack of the ICL slice
    each end with every run ok, runs/min is runs over wall time, and the fused records match the packed ones."""
    script = str(REPO / "benchmarks/gpu_packs.py")
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--scenarios", "icl", "--icl-steps", "4",
                           "--one-runs", "1"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split()[:1] in (["one"], ["packed"], ["fused"]) and len(line.split()) == 5}
    assert [int(rows[m][1]) for m in ("one", "packed", "fused")] == [1, 8, 8]
    for mode, (_, runs, wall, rate, speedup) in rows.items():
        assert float(rate) == pytest.approx(int(runs) / float(wall) * 60, rel=0.02, abs=0.05), mode
    assert rows["one"][4] == "1.00x"
    summary = next(line for line in proc.stdout.splitlines() if "packed vs fused icl_ic_acc over 8 runs" in line)
    assert "status ok: packed 8/8, fused 8/8" in summary
    assert float(summary.split("max |diff| ")[1].split(",")[0]) <= 0.01  # 4 steps: fused = one by one to rounding
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0 and "no CUDA GPU" in proc.stdout
