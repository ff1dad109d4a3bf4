"""Shared tiny fixtures: a procedural dataset file, a tiny ViT config and a pretrained checkpoint."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adaptlab.config import RunSpec, train_config
from adaptlab.data.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"timm_name": None, "img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "mlp_ratio": 2.0, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.safetensors"
    prepare_dataset("tiny", {"kind": "procedural", "classes": 4, "image_size": 16, "n_train": 128, "n_val": 32,
                             "n_test": 32, "seed": 0}, path)
    return path


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tiny_data) -> Path:
    from adaptlab.runner import run_pretrain

    out = tmp_path_factory.mktemp("pretrain")
    spec = {"backbone": "base", "dataset": "tiny", "init": "scratch", "weights": None, "seed": 0, "model": TINY_MODEL,
            "train": train_config({"optimizer": "adamw", "lr": 3e-3, "steps": 10, "batch_size": 32, "eval_every": 5})}
    run_pretrain(spec, tiny_data, out, device="cpu")
    return out / "model.safetensors"


@pytest.fixture
def one_thread():
    """Tiny ops: extra threads only add contention on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_mlp(seed: int = 0):
    """The continual benchmark's ReLU MLP at 8 → 16 → 16 → 4, seeded."""
    import torch

    from adaptlab.continual import bench

    torch.manual_seed(seed)
    return bench.MLP(8, 16, 2, 4)


def fixed_grads(model, n: int, seed: int = 1) -> list:
    """``n`` seeded random gradients for every parameter of ``model``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(n)]


def apply_grads(model, opt, grads) -> None:
    """One optimizer step per gradient set of ``fixed_grads``."""
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()


def pixel_signatures(x) -> list[int]:
    """The R value of pixel (0, 0) of each image: each data fixture image has its own."""
    return [int(v) for v in x[:, 0, 0, 0]]


def image_counter(*arrays):
    """Multiset of images (by bytes): equal counters mean the same images, duplicates included."""
    from collections import Counter

    return Counter(img.tobytes() for x in arrays for img in x)


def assert_disjoint_cover(parts: list[list[int]], universe: set[int]) -> None:
    """The parts (e.g. a dataset's splits) never overlap and together cover ``universe``."""
    flat = [v for p in parts for v in p]
    assert len(flat) == len(set(flat)), "splits overlap (or repeat an item)"
    assert set(flat) == universe


def make_run(trainable="full", patterns=("*",), optimizer="sgd", lr=0.01, seed=0, **train) -> dict:
    cfg = train_config({"steps": 12, "batch_size": 16, "eval_every": 4, "ckpt_every": 4, "lr": lr,
                        "optimizer": optimizer, **train})
    return RunSpec("g", "test", "tiny", trainable, optimizer, lr, seed, cfg, tuple(patterns)).as_dict()


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow files (no results), so a test run never touches the user's results/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "results")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("rules", "workflow", "configs", "profiles"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def snakemake(cwd: Path, *args: str, timeout: int = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def planned_jobs(dry_run_output: str) -> dict[str, list[str]]:
    """rule name → the first output of each job a dry run plans."""
    jobs: dict[str, list[str]] = {}
    # grouped jobs are printed indented under "Group job ..."
    for rule, body in re.findall(r"^ *(?:local)?rule (\w+):\n((?: {4,}\S.*\n)+)", dry_run_output, flags=re.M):
        out = re.search(r"^ +output: ([^,\n]+)", body, flags=re.M)
        jobs.setdefault(rule, []).append(out.group(1) if out else "")
    return jobs


@pytest.fixture(scope="session")
def pipeline_workdir(tmp_path_factory) -> Path:
    """configs/test.yaml run once through the whole DAG (shared: a test that changes it works on a copy)."""
    wd = copy_workflow(tmp_path_factory.mktemp("wf"))
    proc = snakemake(wd, "--cores", "2", "--configfile", "configs/test.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd


LOCAL_SLURM = REPO / "tests" / "slurm" / "local_slurm.sh"


@pytest.fixture(scope="session", autouse=True)
def local_slurm():
    """The real single-node SLURM of tests/test_slurm_real.py, up for the whole session where it is installed.

    Why the whole session: snakemake-executor-plugin-slurm runs `scontrol show config` whenever Snakemake starts
    (it builds its CLI help from it), and with SLURM's client tools installed but no controller that call waits
    ~9 s, in every `snakemake` process of every test. Returns None when up, else why not (tests that need it skip
    with that reason). Where SLURM is not installed nothing is started here (test_slurm_real installs it itself
    when it can)."""
    if shutil.which("slurmctld") is None:
        yield "SLURM is not installed (tests/slurm/local_slurm.sh install needs root and apt-get)"
        return
    import os

    if os.geteuid() != 0:
        yield "a real SLURM needs root (daemons)"
        return
    was_up = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
    reason = None
    if not was_up:
        proc = subprocess.run([str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            reason = f"the local SLURM did not start: {(proc.stderr or proc.stdout).strip()[-600:]}"
    yield reason
    subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=60)
    if not was_up:
        subprocess.run([str(LOCAL_SLURM), "stop"], capture_output=True, timeout=60)
