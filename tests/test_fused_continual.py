"""Fused continual sequences (adaptlab.continual.run.run_continual_fused): runs of one grid, benchmark and model (the
seeds of one method, and methods that differ in optimizer, decay, λ, loss terms or task-boundary change) go through
their task sequences in step as one batched model. Each test compares with the same runs trained one by one
(``run_continual``) or checks a per-run invariant: equal records within float tolerance (Adam, AdamO, coupled
isometry, ReDo, Shrink & Perturb; MLP and ViT), divergence per run, SIGKILL/SIGTERM resume, fuse keys."""
from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from adaptlab.config import validate_config
from adaptlab.continual import specs as continual_specs
from adaptlab.continual.run import fuse_key, run_continual, run_continual_fused
from adaptlab.preemption import EXIT_PREEMPTED
from test_continual import CONTINUAL, MINI
from test_preemption import CONTINUAL_JOB, TESTS

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = {**CONTINUAL["methods"], "coupled": {"optimizer": "adam", "coupled_lambda": 0.05},
           "l2": {"optimizer": "adam", "l2_init": 0.01}, "adamw": {"optimizer": "adamw", "weight_decay": 0.1},
           "adam_l2": {"optimizer": "adam", "weight_decay": 0.01},
           "coupled_big": {"optimizer": "adam", "coupled_lambda": 0.2}}


def _specs(grid: dict) -> dict[str, list[dict]]:
    """method -> its runs' specs (one per seed), in seed order."""
    cfg = copy.deepcopy(MINI)
    cfg["continual"]["methods"] = METHODS
    cfg["continual"]["grids"] = {"g": grid}
    out: dict[str, list[dict]] = {}
    for spec in continual_specs(validate_config(cfg)).values():
        out.setdefault(spec["method_name"], []).append(spec)
    return {m: sorted(s, key=lambda x: x["seed"]) for m, s in out.items()}


MLP_GRID = {"benchmarks": ["rl"], "models": ["mlp"], "methods": ["adam", "adamo", "coupled", "redo", "snp"],
            "seeds": [0, 1, 2], "tasks": 3, "steps": 10, "summary_tasks": 1, "probe": 32, "ntk_every": 2, "ntk_probe": 4}
VIT_GRID = {"benchmarks": ["pd"], "models": ["vit"], "methods": ["adamo", "redo", "snp"], "seeds": [0, 1],
            "tasks": 2, "steps": 5, "summary_tasks": 1, "probe": 16, "ntk_every": 1, "ntk_probe": 2}


def _table(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / f"{name}.parquet").to_pylist()


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=2e-3, abs=2e-4)
    return a == b


def _assert_same_records(dir_a: Path, dir_b: Path) -> None:
    (sa,), (sb,) = _table(dir_a, "summary"), _table(dir_b, "summary")
    for key in ("status", "n_tasks", "steps_done", "acc_first", "acc_last", "dead_frac_end", "final_loss"):
        assert _close(sa[key], sb[key]), (key, sa[key], sb[key])
    for name in ("steps", "continual_task_metrics"):
        ta, tb = _table(dir_a, name), _table(dir_b, name)
        assert len(ta) == len(tb), name
        for ra, rb in zip(ta, tb):
            bad = {k: (ra[k], rb[k]) for k in ra if not _close(ra[k], rb[k])}
            # the eNTK condition number amplifies rounding: compared loosely
            if name == "continual_task_metrics" and ra["metric"] == "ntk_cond":
                assert ra["value"] == pytest.approx(rb["value"], rel=0.05)
                continue
            assert not bad, (name, ra.get("metric"), ra.get("step"), bad)


@pytest.mark.parametrize("grid", [MLP_GRID, VIT_GRID], ids=["mlp", "vit"])
def test_fused_sequences_equal_one_by_one(tmp_path, grid):
    for method, specs in _specs(grid).items():
        alone = [tmp_path / "a" / s["run_id"] for s in specs]
        fused = [tmp_path / "f" / s["run_id"] for s in specs]
        for s, out in zip(specs, alone):
            assert run_continual(s, out, on_error="raise")["status"] == "ok"
        rows = run_continual_fused(specs, fused, on_error="raise", device="cpu")
        assert [r["run_id"] for r in rows] == [s["run_id"] for s in specs]
        for a, f in zip(alone, fused):
            _assert_same_records(a, f)
            assert not (f / "ckpt.safetensors").exists() and not (f / "fit" / "ckpt.safetensors").exists()


def test_fuse_keys_group_the_methods_of_a_grid_benchmark_and_model():
    methods = ["adam", "adamw", "adam_l2", "adamo", "redo", "snp", "coupled", "coupled_big", "l2"]
    specs = _specs({**MLP_GRID, "benchmarks": ["rl", "pd"], "methods": methods})
    keys = {m: {fuse_key(s) for s in ss if s["benchmark_name"] == "rl"} for m, ss in specs.items()}
    assert all(len(k) == 1 for k in keys.values())  # seeds share their method's key
    # one group across methods: optimizer, decay, λ, loss terms (coupled isometry, L2-init) and boundary change are
    # each run's own
    assert len({next(iter(k)) for k in keys.values()}) == 1
    other = {fuse_key(s) for s in specs["adam"] if s["benchmark_name"] == "pd"}
    assert other.isdisjoint(keys["adam"])  # another benchmark: another group
    sgd = copy.deepcopy(specs["adam"][0])
    sgd["method"]["optimizer"] = "sgd"
    assert fuse_key(sgd) not in keys["adam"]  # SGD does not share Adam's stacked update


@pytest.mark.parametrize("methods", [["adam", "adamw", "adam_l2", "adamo", "redo", "snp"],
                                     ["adam", "coupled", "coupled_big", "l2", "adamo"]],
                         ids=["optimizers_and_boundaries", "loss_terms"])
def test_a_group_across_methods_equals_its_runs_one_by_one(tmp_path, methods):
    """Runs of several methods as one fused group: each run's own optimizer, decay, λ, loss terms (coupled isometry
    at two λ, L2-init with its own θ₀) and task-boundary change, the records of each run trained alone."""
    by_method = _specs({**MLP_GRID, "methods": methods, "seeds": [0, 1]})
    specs = [s for ss in by_method.values() for s in ss]
    assert len({fuse_key(s) for s in specs}) == 1
    alone = [tmp_path / "a" / s["run_id"] for s in specs]
    fused = [tmp_path / "f" / s["run_id"] for s in specs]
    for s, out in zip(specs, alone):
        assert run_continual(s, out, on_error="raise")["status"] == "ok"
    rows = run_continual_fused(specs, fused, on_error="raise", device="cpu")
    assert [r["status"] for r in rows] == ["ok"] * len(specs)
    for a, f in zip(alone, fused):
        _assert_same_records(a, f)


def test_a_diverging_run_is_retired_and_the_others_go_on(tmp_path):
    specs = _specs({**MLP_GRID, "methods": ["adam"]})["adam"]
    specs[1] = copy.deepcopy(specs[1])
    specs[1]["method"]["lr"] = 1e12  # this seed alone: its first steps overflow
    outs = [tmp_path / "f" / str(i) for i in range(3)]
    rows = run_continual_fused(specs, outs, on_error="raise", device="cpu")
    assert [r["status"] for r in rows] == ["ok", "diverged", "ok"]
    assert rows[1]["n_tasks"] == 0 and rows[0]["n_tasks"] == rows[2]["n_tasks"] == 3
    for i in (0, 2):  # untouched by their diverged neighbour
        run_continual(specs[i], tmp_path / "a" / str(i), on_error="raise")
        _assert_same_records(tmp_path / "a" / str(i), outs[i])



@pytest.mark.parametrize("sig,stop_at,code", [("SIGTERM", 14, EXIT_PREEMPTED), ("SIGKILL", 23, -signal.SIGKILL)])
def test_a_stopped_fused_group_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, sig, stop_at, code):
    specs = _specs({**MLP_GRID, "methods": ["redo"]})["redo"]
    outs = [str(tmp_path / "stopped" / str(i)) for i in range(3)]
    script = CONTINUAL_JOB.format(tests=TESTS, specs=json.dumps(specs), stop_at=stop_at, sig=sig,
                                  logs=[str(Path(o) / "job.log") for o in outs],
                                  call=f"run_continual_fused(specs, {outs!r}, on_error='raise', device='cpu')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-3000:]
    from adaptlab.train.checkpoint import read_checkpoint_meta

    # SIGTERM in step 4 of task 1 (task 0 in the boundary checkpoints, the rest in fit's); SIGKILL after task 2's
    # third step, with tasks 0 and 1 in the boundary checkpoints
    for out in outs:
        assert read_checkpoint_meta(Path(out) / "ckpt.safetensors")["next_task"] == (1 if sig == "SIGTERM" else 2)
        assert (Path(out) / "fit" / "ckpt.safetensors").exists() == (sig == "SIGTERM")
        assert not (Path(out) / "summary.parquet").exists()
    run_continual_fused(specs, outs, on_error="raise", device="cpu")
    straight = [tmp_path / "straight" / str(i) for i in range(3)]
    run_continual_fused(specs, straight, on_error="raise", device="cpu")
    for out, ref in zip(outs, straight):
        for table in ("steps", "continual_task_metrics"):
            assert _table(Path(out), table) == _table(ref, table), table
        assert not (Path(out) / "ckpt.safetensors").exists()


GROUPED_MODELS = {"mlp": {"kind": "mlp", "width": 16, "depth": 2},
                  "vit": {"kind": "vit", "width": 8, "depth": 2, "num_heads": 2, "patch_size": 4, "mlp_ratio": 2.0}}


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_grouped_forward_and_step_equal_each_runs_model_and_the_vmapped_step(kind):
    """The grouped forward (train.grouped) gives each run's own model output (float64, to rounding); a fused group's
    step through it (losses, online accuracy, gradient norms and gradients, with the coupled-isometry term) equals
    the vmap path's step; the group's loss terms (bench.group_regulariser) are each run's own term on its slice."""
    from adaptlab.config import train_config
    from adaptlab.continual.bench import ContinualTask, build_model, group_regulariser, make_regulariser
    from adaptlab.train.fused import FusedRuns
    from adaptlab.train.grouped import grouped_forward

    def models(dtype):
        out = []
        for seed in range(3):
            torch.manual_seed(seed)
            out.append(build_model(GROUPED_MODELS[kind], 64, 8, 10).to(dtype))
        return out

    runs64 = models(torch.float64)
    forward = grouped_forward(runs64[0])
    assert forward is not None
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in runs64]) for k, _ in
               runs64[0].named_parameters()}
    x = torch.randn(3, 5, 1, 8, 8, dtype=torch.float64)
    want = torch.stack([m(x[r]) for r, m in enumerate(runs64)])
    assert torch.allclose(forward(runs64[0], stacked, x), want, rtol=1e-10, atol=1e-12)

    cfg = train_config({"optimizer": "adam", "lr": 1e-3})
    method = {"coupled_lambda": 0.05, "l2_init": None, "isometry_scale": 1.0}
    runs = models(torch.float32)
    pats = cfg["isometry_patterns"], cfg["isometry_exclude"]
    regs = [make_regulariser(method, m, *pats) for m in runs]
    # per run: the shared coupled term (vmap takes run 0's); alone: other λs, L2-init's θ₀, no term
    mixed = [method, {**method, "coupled_lambda": 0.2}, {**method, "coupled_lambda": None, "l2_init": 0.1},
             {**method, "coupled_lambda": None}]
    mixed_regs = [make_regulariser(m_, r, *pats) for m_, r in zip(mixed, runs + runs[:1])]
    terms = group_regulariser(mixed, runs + runs[:1], *pats)
    with torch.no_grad():
        for p in runs[2].parameters():
            p.add_(0.01)  # L2-init's θ₀ is the weights as they were
    stacked = {k: torch.stack([dict(m.named_parameters())[k] for m in runs + runs[:1]])
               for k, _ in runs[0].named_parameters()}
    want = [r(m) if r is not None else torch.tensor(0.0) for r, m in zip(mixed_regs, runs + runs[:1])]
    assert torch.allclose(terms(stacked), torch.stack(want), rtol=1e-5, atol=1e-7)
    assert group_regulariser([{**method, "coupled_lambda": None}] * 2, runs[:2], *pats) is None
    tasks, shared = [], group_regulariser([method] * 3, runs, *pats)
    for seed, m in enumerate(runs):
        g = torch.Generator().manual_seed(seed)
        tasks.append(ContinualTask(torch.randn(40, 64, generator=g), torch.randint(10, (40,), generator=g), None,
                                   seed, 0, 8, regs[seed], group_regulariser=shared))
    group = FusedRuns(runs, tasks, [1e-3] * 3, cfg, torch.device("cpu"))
    assert group._grouped_loss
    results = []
    for grouped in (True, False):
        group._grouped_loss = grouped
        loss, values = group.losses(0, 16)
        norms = group.backward_clip(loss, values, math.inf)
        results.append((values, norms, {k: p.grad.clone() for k, p in group.params.items()}))
    (v_g, n_g, g_g), (v_v, n_v, g_v) = results
    assert v_g == pytest.approx(v_v, rel=1e-5) and n_g == pytest.approx(n_v, rel=1e-5)
    assert all(t.online[0] == t.online[1] for t in tasks)  # the same batch accuracies
    for k in g_g:
        assert torch.allclose(g_g[k], g_v[k], rtol=1e-4, atol=1e-6), k


def test_the_grouped_linear_gives_each_runs_gradients_also_under_bf16_autocast():
    """train.grouped.linear's own backward = autograd through each run's F.linear (input, weight and bias); under
    autocast (a GPU group's bf16) its gradients come back in each tensor's dtype."""
    import torch.nn.functional as F

    from adaptlab.train.grouped import linear

    torch.manual_seed(0)
    x, w, b = torch.randn(3, 2, 5, 4), torch.randn(3, 6, 4), torch.randn(3, 6)
    upstream = torch.randn(3, 2, 5, 6)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    (linear(*ours) * upstream).sum().backward()
    for r in range(3):
        each = [t[r].clone().requires_grad_() for t in (x, w, b)]
        (F.linear(*each) * upstream[r]).sum().backward()
        for mine, ref in zip(ours, each):
            assert torch.allclose(mine.grad[r], ref.grad, rtol=1e-5, atol=1e-6)
    half = [x, w.clone().requires_grad_(), b.clone().requires_grad_()]  # the input needs no gradient here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(*half)
    (out.float() * upstream).sum().backward()
    assert out.dtype == torch.bfloat16 and half[1].grad.dtype == half[2].grad.dtype == torch.float32
    for mine, ref in zip(half[1:], ours[1:]):
        assert torch.allclose(mine.grad, ref.grad, rtol=0.05, atol=0.1)


def test_a_model_the_grouped_forward_does_not_cover_takes_the_vmap_path():
    from timm.models.vision_transformer import VisionTransformer

    from adaptlab.models.vit import create_vit
    from adaptlab.train.grouped import grouped_forward

    small = {"img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
    assert grouped_forward(create_vit(small, 10)) is not None  # a class token read by token pooling: covered
    # preconditioned attention subclasses timm's Attention with other maths; register tokens; dropout
    assert grouped_forward(create_vit({**small, "attention": {"kind": "preconditioned"}}, 10)) is None
    assert grouped_forward(create_vit(small, 10, reg_tokens=2)) is None
    assert grouped_forward(create_vit(small, 10, proj_drop_rate=0.1)) is None
    assert grouped_forward(VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=8,
                                             depth=1, num_heads=2, global_pool="avg", class_token=True)) is None
    assert grouped_forward(torch.nn.Linear(3, 2)) is None  # no grouped form registered
