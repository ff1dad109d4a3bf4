"""Fused training (adaptlab.train.fused): a pack's same-shape runs as one batched model, through the one loop.

Each test compares with the same runs trained one by one (runner.run_finetune) or checks a per-run invariant:
equal records within float tolerance, frozen tensors bit-identical, divergence per run, SIGKILL resume,
determinism, kept records restored.
"""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from adaptlab.data.store import load_dataset
from adaptlab.records import TIMING_COLUMNS
from adaptlab.runner import build_finetune, run_finetune, run_finetune_fused
from adaptlab.config import train_config
from adaptlab.train.fused import FusedRuns
from adaptlab.train.stacked import StackedOptimizer, isometry_matrices
from adaptlab.train.optim import build_optimizer
from adaptlab.train.loop import fit
from conftest import TINY_MODEL, make_run

CPU = torch.device("cpu")
# Fused and one-by-one runs differ only by float rounding (batched matmuls, explicit attention instead of
# scaled_dot_product_attention): measured ≤ 5e-6 on the loss over 12 steps; the tolerance leaves room.
LOSS_ATOL = 1e-4


def _runs(optimizer: str, lr_scale: float = 1.0, **train) -> list[dict]:
    """Four runs of one fuse key: different lr, seed and trainable set."""
    runs = [make_run("full", ("*",), optimizer, 0.01 * lr_scale, 0, **train),
            make_run("head", (), optimizer, 0.05 * lr_scale, 1, **train),
            make_run("mha", ("blocks.*.attn.*",), optimizer, 0.02 * lr_scale, 0, **train),
            make_run("full", ("*",), optimizer, 0.03 * lr_scale, 2, **train)]
    for r in runs:
        r["model"] = TINY_MODEL
    return runs


def _steps(out: Path) -> dict[str, list]:
    return pq.read_table(out / "steps.parquet").to_pydict()


def _assert_same_run(a: dict, b: dict, dir_a: Path, dir_b: Path) -> None:
    assert a["status"] == b["status"]
    assert a["best_step"] == b["best_step"] and a["steps_done"] == b["steps_done"]
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 32 + 1e-9)  # at most one of 32 test images
    sa, sb = _steps(dir_a), _steps(dir_b)
    assert sa["step"] == sb["step"]
    for col in ("loss", "grad_norm", "lr"):
        for x, y in zip(sa[col], sb[col]):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=LOSS_ATOL, rel=1e-3), col
    assert [v for v in sa["val_acc"] if v == v] == pytest.approx([v for v in sb["val_acc"] if v == v], abs=1 / 32 + 1e-9)


# Adam at the SGD lrs is chaotic on this tiny model (rounding differences grow to 4e-3 in 12 steps): a tenth
@pytest.mark.parametrize("optimizer,train", [("sgd", {}), ("adamw", {"weight_decay": 0.05}),
                                             ("adam", {"weight_decay": 0.01, "lr_scale": 0.1}),
                                             ("adamo", {"isometry_lambda": 0.1, "lr_scale": 0.1})])
def test_fused_equals_one_by_one(tiny_data, tiny_pretrained, tmp_path, optimizer, train):
    runs = _runs(optimizer, **train)
    alone = [run_finetune(r, TINY_MODEL, tiny_pretrained, tiny_data, tmp_path / f"a{i}", device="cpu")
             for i, r in enumerate(runs)]
    fused = run_finetune_fused(runs, tiny_pretrained, tiny_data, [tmp_path / f"f{i}" for i in range(4)], device="cpu")
    assert [r["run_id"] for r in fused] == [r["run_id"] for r in alone]
    for i, (a, f) in enumerate(zip(alone, fused)):
        assert a["status"] == "ok"
        _assert_same_run(a, f, tmp_path / f"a{i}", tmp_path / f"f{i}")
        assert a["trainable_params"] == f["trainable_params"]  # each run's own trainable set is counted


def test_stacked_adamo_steps_each_run_as_adamo_alone():
    # three runs' slices of tall, split (qkv) and wide matrices, a bias and an excluded head; run 2 has fc1 frozen
    torch.manual_seed(0)
    shapes = {k: tuple(p.shape) for k, p in _blocks_and_head().named_parameters()}
    lrs, n = [0.01, 0.03, 0.02], 3
    init = {k: torch.randn(n, *s) * 0.4 for k, s in shapes.items()}
    masks = {k: torch.tensor([True, True, k != "blocks.0.mlp.fc1.weight"]) for k in shapes}
    grads = [{k: torch.randn(n, *s) for k, s in shapes.items()} for _ in range(6)]

    def stacked(lam: float) -> dict[str, torch.Tensor]:
        cfg = train_config({"optimizer": "adamo", "isometry_lambda": lam, "weight_decay": 0.1})  # AdamO ignores wd
        params = {k: v.clone() for k, v in init.items()}
        opt = StackedOptimizer(params, masks, torch.tensor(lrs), cfg, isometry_matrices([_blocks_and_head()], [cfg]))
        for g in grads:
            for k, p in params.items():
                p.grad = g[k].clone()
            opt.step(torch.ones(n, dtype=torch.bool))
        return params

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stable step: no instability warning
        fused, plain_adam = stacked(0.5), stacked(0.0)
    with pytest.warns(RuntimeWarning, match="isometry step is unstable"):  # the slice that needs it warns
        stacked(50.0)
    cfg = train_config({"optimizer": "adamo", "isometry_lambda": 0.5, "weight_decay": 0.1})
    for r in range(n):
        _assert_steps_as_alone(fused, init, grads, r, [k for k in shapes if masks[k][r]], {**cfg, "lr": lrs[r]})
        if r == 2:
            assert torch.equal(fused["blocks.0.mlp.fc1.weight"][2], init["blocks.0.mlp.fc1.weight"][2])
    # the isometry step is what moved them: the regularised matrices, not the bias or the excluded head
    for k in shapes:
        moved = (fused[k] - plain_adam[k]).abs().max().item()
        assert (moved > 1e-3) if k.endswith("weight") and not k.startswith("head") else moved == 0, k


@pytest.mark.parametrize("optimizer,extra", [("adam", {"weight_decay": 0.01}), ("adamw", {"weight_decay": 0.1}),
                                             ("adamo", {"isometry_lambda": 0.5})])
def test_stacked_adam_at_one_lr_takes_the_fused_kernel_and_steps_each_run_as_alone(optimizer, extra, monkeypatch):
    """Every run at one lr, training every tensor: the stacked optimizer steps the whole stack in torch's fused Adam
    kernel (the isometry step apart), and each run's slice moves as that optimizer alone moves the run."""
    torch.manual_seed(1)
    shapes = {k: tuple(p.shape) for k, p in _blocks_and_head().named_parameters()}
    n, lr = 3, 0.02
    init = {k: torch.randn(n, *s) * 0.4 for k, s in shapes.items()}
    grads = [{k: torch.randn(n, *s) for k, s in shapes.items()} for _ in range(5)]
    cfg = train_config({"optimizer": optimizer, **extra})
    params = {k: v.clone() for k, v in init.items()}
    opt = StackedOptimizer(params, {k: torch.ones(n, dtype=torch.bool) for k in shapes}, torch.full((n,), lr), cfg,
                           isometry_matrices([_blocks_and_head()], [cfg]))
    assert _kernel_steps(opt, params, grads, monkeypatch) == len(grads)
    for r in range(n):
        _assert_steps_as_alone(params, init, grads, r, list(shapes), {**cfg, "lr": lr})


@pytest.mark.parametrize("lrs", [[0.02] * 4, [0.01, 0.03, 0.02, 0.005]], ids=["kernel", "masked"])
def test_a_stack_of_adam_adamw_and_adamo_runs_steps_each_run_as_its_own_optimizer(lrs, monkeypatch):
    """Runs of one group with their own optimizer, decay and λ (a continual method grid fused across methods):
    each slice moves as its optimizer alone moves the run, in the fused kernel (one lr) and the masked update."""
    torch.manual_seed(2)
    shapes = {k: tuple(p.shape) for k, p in _blocks_and_head().named_parameters()}
    n = len(lrs)
    runs = [train_config({"optimizer": "adam", "weight_decay": 0.01}), train_config({"optimizer": "adamw", "weight_decay": 0.1}),
            train_config({"optimizer": "adamo", "isometry_lambda": 0.5, "weight_decay": 0.1}),
            train_config({"optimizer": "adam", "weight_decay": 0.0})]
    init = {k: torch.randn(n, *s) * 0.4 for k, s in shapes.items()}
    grads = [{k: torch.randn(n, *s) for k, s in shapes.items()} for _ in range(5)]
    params = {k: v.clone() for k, v in init.items()}
    opt = StackedOptimizer(params, {k: torch.ones(n, dtype=torch.bool) for k in shapes}, torch.tensor(lrs), runs[0],
                           isometry_matrices([_blocks_and_head()] * n, runs), runs)
    assert _kernel_steps(opt, params, grads, monkeypatch) == (len(grads) if len(set(lrs)) == 1 else 0)
    for r in range(n):
        _assert_steps_as_alone(params, init, grads, r, list(shapes), {**runs[r], "lr": lrs[r]})


def test_a_group_mixing_sgd_with_adam_or_other_training_values_is_refused():
    sgd, adam = train_config({"optimizer": "sgd"}), train_config({"optimizer": "adam"})
    with pytest.raises(ValueError, match="mix the optimizers"):
        StackedOptimizer({}, {}, torch.ones(2), sgd, None, [sgd, adam])
    with pytest.raises(ValueError, match="'clip_grad'"):
        StackedOptimizer({}, {}, torch.ones(2), adam, None, [adam, {**adam, "clip_grad": 0.5}])


def _kernel_steps(opt: StackedOptimizer, params: dict, grads: list[dict], monkeypatch) -> int:
    """Step ``opt`` once per gradient set, every run active; how many steps took the fused kernel."""
    calls = []
    fused_step = StackedOptimizer._fused_step
    monkeypatch.setattr(StackedOptimizer, "_fused_step", lambda self: calls.append(1) or fused_step(self))
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step(torch.ones(len(opt.lr), dtype=torch.bool))
    return len(calls)


def _assert_steps_as_alone(stacked: dict, init: dict, grads: list[dict], r: int, names: list[str], cfg: dict) -> None:
    """Run ``r``'s slice of ``stacked`` equals its tensors ``names`` stepped alone from ``init`` with ``grads``."""
    named = [(k, torch.nn.Parameter(init[k][r].clone())) for k in names]
    alone = build_optimizer(named, cfg)
    for g in grads:
        for k, p in named:
            p.grad = g[k][r].clone()
        alone.step()
    for k, p in named:
        assert torch.allclose(stacked[k][r], p.detach(), atol=1e-6, rtol=1e-5), (r, k)


def _blocks_and_head() -> torch.nn.Module:
    """timm-style names: blocks.0.attn.qkv (split 3), blocks.0.mlp.fc1 (tall), fc2 (wide, + bias), head (excluded)."""
    blk, m = torch.nn.Module(), torch.nn.Module()
    blk.attn, blk.mlp = torch.nn.Module(), torch.nn.Module()
    blk.attn.qkv = torch.nn.Linear(4, 12, bias=False)
    blk.mlp.fc1, blk.mlp.fc2 = torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(8, 4)
    m.blocks, m.head = torch.nn.ModuleList([blk]), torch.nn.Linear(4, 3, bias=False)
    return m


def test_fused_frozen_weights_stay_bit_identical(tiny_data, tiny_pretrained):
    # weight decay and momentum on a stacked tensor would move the slices of runs where it is frozen
    runs = _runs("adamw", weight_decay=0.1)
    data = load_dataset(tiny_data)
    built = [build_finetune(r, TINY_MODEL, tiny_pretrained, data, CPU) for r in runs]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m, _ in built]
    group = FusedRuns([m for m, _ in built], [t for _, t in built], [r["lr"] for r in runs], runs[0]["train"], CPU)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = fit(group, None, runs[0]["train"], [Path(tmp) / f"r{i}" for i in range(4)], device=CPU,
                      config_id=[f"c{i}" for i in range(4)])
    assert all(r.status == "ok" for r in results)
    for (model, _), init in zip(built, before):
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert not torch.equal(p.detach(), init[name]), f"trainable {name} did not change"
            else:
                assert torch.equal(p.detach(), init[name]), f"frozen {name} changed"
    # run 1 trains only the head: its blocks are its initial (pretrained) weights, bit for bit
    assert torch.equal(built[1][0].blocks[0].attn.qkv.weight, before[1]["blocks.0.attn.qkv.weight"])


def test_fused_divergence_is_per_run(tiny_data, tiny_pretrained, tmp_path):
    runs = _runs("sgd", clip_grad=None)
    runs[2] = {**make_run("full", ("*",), "sgd", 1e6, 0, clip_grad=None), "model": TINY_MODEL}  # the preset's unstable grid
    fused = run_finetune_fused(runs, tiny_pretrained, tiny_data, [tmp_path / f"f{i}" for i in range(4)], device="cpu")
    assert [r["status"] for r in fused] == ["ok", "ok", "diverged", "ok"]
    assert fused[2]["steps_done"] < 12 and fused[2]["test_acc"] is None
    for i in (0, 1, 3):  # the others are unaffected: equal to their one-by-one twins
        alone = run_finetune(runs[i], TINY_MODEL, tiny_pretrained, tiny_data, tmp_path / f"a{i}", device="cpu")
        _assert_same_run(alone, fused[i], tmp_path / f"a{i}", tmp_path / f"f{i}")


def _kill_runs(diverging: bool) -> list[dict]:
    runs = _runs("adamw", weight_decay=0.05, clip_grad=None)
    if diverging:  # a member that diverges before the first checkpoint: its checkpoint says so, at its own step
        runs[2] = {**make_run("full", ("*",), "adamw", 1e6, 0, weight_decay=0.05, clip_grad=None), "model": TINY_MODEL}
    return runs


KILL_FUSED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_fused import _kill_runs
from adaptlab.runner import run_finetune_fused
def die(step):
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
run_finetune_fused(_kill_runs({diverging!r}), {pre!r}, {data!r}, {outs!r}, device="cpu", on_step=die)
"""


def _metrics(row: dict) -> dict:
    """The non-timing columns, NaN spelled out (a diverged run's final loss; NaN != NaN)."""
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items() if k not in TIMING_COLUMNS}


@pytest.mark.parametrize("diverging", [False, True])
def test_fused_pack_killed_resumes_to_the_same_records(tiny_data, tiny_pretrained, tmp_path, diverging):
    killed = [str(tmp_path / f"k{i}") for i in range(4)]
    script = KILL_FUSED.format(tests=str(Path(__file__).parent), pre=str(tiny_pretrained), data=str(tiny_data),
                               outs=killed, diverging=diverging)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert all((Path(k) / "ckpt.safetensors").exists() and not (Path(k) / "summary.parquet").exists() for k in killed)
    runs = _kill_runs(diverging)
    resumed = run_finetune_fused(runs, tiny_pretrained, tiny_data, killed, device="cpu")
    assert [r["resumed_from"] for r in resumed] == [4] * 4  # checkpoints every 4 steps; killed after step 6
    straight = run_finetune_fused(runs, tiny_pretrained, tiny_data, [tmp_path / f"s{i}" for i in range(4)],
                                  device="cpu")
    assert [r["status"] for r in straight] == (["ok", "ok", "diverged", "ok"] if diverging else ["ok"] * 4)
    for i, (a, b) in enumerate(zip(resumed, straight)):
        assert _metrics(a) == _metrics(b)
        assert _steps(Path(killed[i])) == _steps(tmp_path / f"s{i}")


def test_fused_is_deterministic(tiny_data, tiny_pretrained, tmp_path):
    runs = _runs("sgd")
    first = run_finetune_fused(runs, tiny_pretrained, tiny_data, [tmp_path / f"a{i}" for i in range(4)], device="cpu")
    again = run_finetune_fused(runs, tiny_pretrained, tiny_data, [tmp_path / f"b{i}" for i in range(4)], device="cpu")
    for i, (a, b) in enumerate(zip(first, again)):
        assert {k: v for k, v in _metrics(a).items() if k != "config_json"} == \
            {k: v for k, v in _metrics(b).items() if k != "config_json"}
        assert _steps(tmp_path / f"a{i}") == _steps(tmp_path / f"b{i}")


def test_fused_pack_restores_unchanged_members(tiny_data, tiny_pretrained, tmp_path, capfd):
    runs = _runs("sgd")
    outs = [tmp_path / f"r{i}" for i in range(4)]
    first = run_finetune_fused(runs, tiny_pretrained, tiny_data, outs, device="cpu")
    for out in outs:  # what Snakemake does before it reruns the pack: every member's outputs go
        (out / "summary.parquet").unlink()
        (out / "steps.parquet").unlink()
    changed = [{**runs[0], "lr": 0.011, "train": {**runs[0]["train"], "lr": 0.011}}, *runs[1:]]
    capfd.readouterr()
    again = run_finetune_fused(changed, tiny_pretrained, tiny_data, outs, device="cpu")
    err = capfd.readouterr().err
    assert err.count("restored, not retrained") == 3 and str(outs[0]) not in err
    assert again[0]["lr"] == 0.011 and again[0]["final_loss"] != first[0]["final_loss"]
    for i in (1, 2, 3):  # the very records of the first pack (same wall_seconds: not trained again)
        assert again[i] == first[i]
        assert (outs[i] / "summary.parquet").exists() and (outs[i] / "steps.parquet").exists()


def test_fused_icl_runs_equal_one_by_one(tmp_path):
    """An ICL K × seed sweep of one positional scheme, fused (a different world per run) vs one by one."""
    import yaml

    from adaptlab import icl
    from adaptlab.config import validate_config
    from adaptlab.icl.run import fuse_key, run_icl, run_icl_fused

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs/test.yaml").read_text())
    cfg["icl"]["unimodal"] = {"schemes": ["rope"], "Ks": [32, 64], "seeds": [0, 1]}
    cfg["icl"]["train"] = {"steps": 20, "eval_every": 10, "batch_size": 32, "optimizer": "adam", "lr": 0.003}
    specs = [s for s in icl.specs(validate_config(cfg)).values() if s["kind"] == "icl_uni" and s["scheme"] == "rope"]
    assert len(specs) == 4 and len({fuse_key(s) for s in specs}) == 1
    alone = [run_icl(s, tmp_path / f"a{i}", device="cpu") for i, s in enumerate(specs)]
    fused = run_icl_fused(specs, [tmp_path / f"f{i}" for i in range(4)], [None] * 4, device="cpu")
    for i, (a, f) in enumerate(zip(alone, fused)):
        assert a["status"] == f["status"] == "ok"
        _assert_same_run(a, f, tmp_path / f"a{i}", tmp_path / f"f{i}")
        for col in ("icl_ic_acc", "icl_iw_acc", "icl_test_ic_acc", "icl_test_iw_acc"):
            assert f[col] == pytest.approx(a[col], abs=1 / 64 + 1e-9), col
        ea = pq.read_table(tmp_path / f"a{i}" / "icl_eval.parquet").to_pydict()
        ef = pq.read_table(tmp_path / f"f{i}" / "icl_eval.parquet").to_pydict()
        assert ea["step"] == ef["step"] and ea["metric"] == ef["metric"]
        assert (tmp_path / f"f{i}" / "model.safetensors").stat().st_size > 0  # the stage-1 weights output
