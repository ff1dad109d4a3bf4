"""Study 5: the plasticity metrics, ReDo, the registry/fit extensions and a tiny end-to-end continual pipeline
(AdamO's own invariants: test_adamo.py)."""
from __future__ import annotations

import copy
import subprocess
import sys

import duckdb
import pytest
import torch
import torch.nn as nn
import yaml

from adaptlab.aggregate import aggregate
from adaptlab.config import ConfigError, expand_runs, train_config, validate_config
from adaptlab.continual import bench, metrics, specs as continual_specs
from adaptlab.continual.run import run_continual
from adaptlab.train.adamo import AdamO
from adaptlab.train.loop import fit
from adaptlab.train.optim import build_optimizer
from conftest import TINY_MODEL, apply_grads, copy_workflow, fixed_grads, make_run, small_mlp


pytestmark = pytest.mark.usefixtures("one_thread")


def test_unit_and_spectral_metrics_on_constructed_networks():
    m = small_mlp()
    x = torch.randn(64, 8)
    with torch.no_grad():
        m.layers[0].weight[:4] = 0.0  # 4 of 16 units of layer 0: pre-activation = bias < 0 → dead
        m.layers[0].bias[:4] = -1.0
        m.layers[0].bias[4:] = 10.0  # the rest always fire
    act = metrics.unit_activity(m, x)
    assert act["layers.0"]["dead"] == 4 / 16
    assert act["layers.0"]["mask_0"][:4].all() and not act["layers.0"]["mask_0"][4:].any()
    with torch.no_grad():
        for layer in m.layers:
            layer.bias.fill_(-1e6)
    assert all(v["dead"] == 1.0 for v in metrics.unit_activity(m, x).values())
    assert metrics.effective_rank(torch.ones(7)) == pytest.approx(7)
    st = metrics.sv_stats(torch.eye(5))
    assert st["cond"] == pytest.approx(1) and st["eff_rank"] == pytest.approx(5) and st["gram_dev"] == 0
    # linear model f = Wx: eNTK = (XXᵀ) ⊗ I_C, so κ = cond(XXᵀ)
    lin = nn.Linear(6, 3, bias=False)
    xs = torch.randn(4, 6)
    gram = (xs.double() @ xs.double().T)
    ev = torch.linalg.eigvalsh(gram)
    assert metrics.entk_condition(lin, xs) == pytest.approx((ev[-1] / ev[0]).item(), rel=1e-4)


def _full_theta(m, x):
    """JJᵀ of the whole Jacobian, built row by row with autograd (float64)."""
    params = list(m.parameters())
    out = m(x)
    rows = [torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in
                       zip(torch.autograd.grad(out[i, c], params, retain_graph=True, allow_unused=True), params)])
            for i in range(out.shape[0]) for c in range(out.shape[1])]
    j = torch.stack(rows).double()
    return j @ j.T


def test_entk_condition_of_a_multi_tensor_model_matches_the_full_jacobian():
    """Θ is summed tensor by tensor (the MLP's Linears in factored form); it must equal JJᵀ of the whole Jacobian."""
    m, x = small_mlp(), torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    assert len(list(m.parameters())) > 2
    assert metrics._linear_blocks(m, x)[1] == {n for n, _ in m.named_parameters()}
    ev = torch.linalg.eigvalsh(_full_theta(m, x)).clamp_min(1e-12)
    assert metrics.entk_condition(m, x) == pytest.approx((ev[-1] / ev[0]).item(), rel=1e-6)


class _Mixed(nn.Module):
    """Linears the factored form must leave to the Jacobian: one whose output ReLU changes in place, one called
    twice; a LayerNorm; only the head is factored."""

    def __init__(self):
        super().__init__()
        self.inp, self.act, self.shared = nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.shared(torch.tanh(self.shared(self.act(self.inp(x)))))))


@pytest.mark.parametrize("kind", ["mixed", "vit"])
def test_entk_gram_with_factored_and_jacobian_blocks_equals_the_full_jacobian(kind):
    torch.manual_seed(0)
    if kind == "mixed":
        m, x = _Mixed(), torch.randn(6, 8)
    else:  # the study's ViT: its Linears see tokens (Jacobian path) except the head on the pooled features
        m = bench.build_model({"kind": "vit", "width": 16, "depth": 1, "num_heads": 2, "patch_size": 2,
                               "mlp_ratio": 2.0}, 16, 4, 3)
        x = torch.randn(5, 1, 4, 4)
    m.eval()
    assert metrics._linear_blocks(m, x)[1] == {"head.weight", "head.bias"}
    ref = _full_theta(m, x)
    theta = metrics.entk_gram(m, x)
    assert theta.dtype == torch.float64 and theta.shape == ref.shape
    assert torch.allclose(theta, ref, rtol=1e-5, atol=1e-9 * ref.abs().max().item())


def test_redo_resets_dormant_units_and_their_moments():
    m = small_mlp()
    opt = AdamO(m.parameters(), lr=1e-2, isometry_lambda=0.0)
    apply_grads(m, opt, fixed_grads(m, 2))
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:3] = True
    n = bench.redo_reset(m, small_mlp(seed=9), opt, {"layers.0": mask})
    assert n == 3
    assert torch.equal(m.layers[1].weight[:, :3], torch.zeros(16, 3))
    assert (opt.state[m.layers[0].weight]["exp_avg"][:3] == 0).all()
    assert (opt.state[m.layers[0].weight]["exp_avg"][3:] != 0).any()


def test_fit_carries_an_optimizer_across_tasks(tmp_path):
    x, _, _ = bench.load_inputs({"inputs": "gaussian", "n": 64, "dim": 8}, 0)
    m = small_mlp()
    cfg = train_config({"optimizer": "adamo", "lr": 3e-3, "steps": 5, "batch_size": 8, "warmup_steps": 0,
                        "min_lr_factor": 1.0, "clip_grad": None, "eval_every": 5, "ckpt_every": 0,
                        "isometry_exclude": ["head*"]})
    opt = build_optimizer(list(m.named_parameters()), cfg)
    for t in range(2):
        task = bench.ContinualTask(x, torch.randint(4, (64,)), None, 0, t)
        res = fit(m, task, cfg, tmp_path, device=torch.device("cpu"), config_id=f"t{t}", optimizer=opt)
        assert res.status == "ok" and len(task.online) == 5
    assert opt.state[m.layers[0].weight]["step"].item() == 10
    assert opt.param_groups[0]["initial_lr"] == 3e-3


def test_a_task_whose_test_split_is_its_val_set_takes_the_best_val_metrics_as_test(tmp_path):
    """A task without held-out images tests on its training set, the val set itself (``test_is_val``): fit reports
    the best-val metrics as the test metrics, which is what evaluating the best weights on the test split gives,
    without that second evaluation. A task with held-out images is evaluated on them."""
    x, _, _ = bench.load_inputs({"inputs": "gaussian", "n": 64, "dim": 8}, 0)
    y = torch.randint(4, (64,), generator=torch.Generator().manual_seed(0))
    cfg = train_config({"optimizer": "adam", "lr": 3e-3, "steps": 6, "batch_size": 8, "warmup_steps": 0,
                        "min_lr_factor": 1.0, "clip_grad": None, "eval_every": 3, "ckpt_every": 0})
    held_out = (torch.randn(16, 8), torch.randint(4, (16,)))
    for test, same in ((None, True), (held_out, False)):
        torch.manual_seed(0)
        m = small_mlp()
        task = bench.ContinualTask(x, y, None, 0, 0, test=test)
        calls = []
        evaluate = task.evaluate
        task.evaluate = lambda model, split, autocast=None: calls.append(split) or evaluate(model, split)
        res = fit(m, task, cfg, tmp_path / str(same), device=torch.device("cpu"), config_id="t")
        assert task.test_is_val is same and calls == ["val", "val"] + ([] if same else ["test"])
        assert res.test == evaluate(m, "test")  # m holds the best weights after fit
        assert (res.test == res.best_val) is same


def test_a_groups_stacked_batches_are_its_runs_own_train_batches():
    """``ContinualTask.stacked_batches`` (a fused group's draw) gives, for every step, the runs' own
    ``train_batch``es stacked: the same indices from each run's (seed, task, step), images and labels bit for bit;
    tasks whose sets differ in size get None (the group stacks their batches then)."""
    g = torch.Generator().manual_seed(0)
    tasks = [bench.ContinualTask(torch.randn(96, 64, generator=g), torch.randint(10, (96,), generator=g),
                                 torch.randperm(64, generator=g) if s % 2 else None, s, 3 + s, image_side=8)
             for s in range(4)]
    draw = bench.ContinualTask.stacked_batches(tasks)
    for step in (0, 1, 299):
        xs, ys = draw(step, 32)
        assert xs.shape == (4, 32, 1, 8, 8) and ys.shape == (4, 32)
        for r, t in enumerate(tasks):
            x, y = t.train_batch(step, 32)
            assert torch.equal(xs[r], x) and torch.equal(ys[r], y)
    assert not torch.equal(draw(0, 32)[1], draw(1, 32)[1])
    odd = bench.ContinualTask(torch.randn(50, 64), torch.randint(10, (50,)), None, 9, 0, image_side=8)
    assert bench.ContinualTask.stacked_batches(tasks + [odd]) is None


def test_adamo_in_a_core_finetune_grid(tmp_path, tiny_data, tiny_pretrained):
    from adaptlab.runner import run_finetune

    base = {"datasets": {"d": {"kind": "digits", "image_size": 16}}, "model": {}, "pretrain": {"dataset": "d"},
            "finetune": {"grids": {"g": {"datasets": ["d"], "seeds": [0], "lrs": [1e-3], "optimizers": ["adamo"],
                                         "train": {"isometry_lambda": 0.05}}}}}
    runs = expand_runs(validate_config(base))
    assert runs[0].optimizer == "adamo" and runs[0].train["isometry_lambda"] == 0.05
    bad = copy.deepcopy(base)
    bad["finetune"]["grids"]["g"]["train"]["isometry_lambda"] = -1
    with pytest.raises(ConfigError, match="isometry_lambda"):
        validate_config(bad)
    row = run_finetune(make_run(optimizer="adamo", lr=1e-3, isometry_lambda=0.05), TINY_MODEL, tiny_pretrained,
                       tiny_data, tmp_path, device="cpu", on_error="raise")
    assert row["status"] == "ok" and row["optimizer"] == "adamo" and 0 <= row["test_acc"] <= 1


CONTINUAL = {
    "benchmarks": {"rl": {"inputs": "gaussian", "labels": "random", "n": 64, "dim": 8},
                   "pd": {"inputs": "digits", "labels": "permuted", "n": 64}},
    "models": {"mlp": {"kind": "mlp", "width": 16, "depth": 2},
               "vit": {"kind": "vit", "width": 8, "depth": 1, "num_heads": 2, "patch_size": 4}},
    "methods": {"adam": {"optimizer": "adam"}, "adamo": {"optimizer": "adamo", "isometry_lambda": 0.1},
                "redo": {"optimizer": "adam", "redo_tau": 0.1}, "snp": {"optimizer": "adam", "shrink": 0.8, "perturb": 0.1}},
    "grids": {"t": {"benchmarks": ["rl"], "models": ["mlp"], "methods": ["adam", "adamo"],
                    "seeds": [0], "tasks": 3, "steps": 10, "summary_tasks": 1, "probe": 32, "ntk_every": 2,
                    "ntk_probe": 4}},
}
# run in-process (no Snakemake job each): the ViT, ReDo and Shrink & Perturb paths
MORE_GRIDS = {"v": {"benchmarks": ["pd"], "models": ["vit"], "methods": ["adamo", "redo", "snp"], "seeds": [0],
                    "tasks": 2, "steps": 5, "summary_tasks": 1, "probe": 16, "ntk_every": 1, "ntk_probe": 2}}
MINI = {"device": "cpu", "threads": {"pretrain": 1, "finetune": 1},
        "datasets": {"src": {"kind": "procedural", "classes": 4, "image_size": 16, "n_train": 64, "n_val": 32,
                             "n_test": 32, "seed": 0}},
        "model": {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
        "pretrain": {"dataset": "src", "train": {"steps": 2, "batch_size": 32, "eval_every": 2}},
        "finetune": {"defaults": {"steps": 2, "batch_size": 32, "eval_every": 2},
                     "grids": {"main": {"datasets": ["src"], "seeds": [0], "lrs": [0.01], "trainable": ["head"]}}},
        "continual": CONTINUAL}


def test_continual_config_errors_name_the_key():
    for edit, match in [
        (lambda c: c["grids"]["t"]["methods"].append("nope"), r"continual.grids.t.methods\[2\]: unknown method"),
        (lambda c: c["grids"]["t"].update(models=["vit"]), "needs image inputs"),
        (lambda c: c["methods"]["adam"].update(isometry_lambda=0.1), "continual.methods.adam.isometry_lambda"),
    ]:
        cfg = copy.deepcopy(MINI)
        edit(cfg["continual"])
        with pytest.raises(ConfigError, match=match):
            continual_specs(validate_config(cfg))
    cfg = copy.deepcopy(MINI)
    cfg["continual"]["methods"]["adamo"]["isometry_lambda"] = -0.5
    with pytest.raises(ConfigError, match="continual.methods.adamo.isometry_lambda"):
        validate_config(cfg)


def test_grid_fused_adam_switch_reaches_the_optimizer_and_leaves_other_runs_alone():
    from adaptlab.config import config_hash
    from adaptlab.continual.run import fit_config

    base = continual_specs(validate_config(copy.deepcopy(MINI)))
    cfg = copy.deepcopy(MINI)
    cfg["continual"]["grids"]["t"]["fused_adam"] = True
    switched = continual_specs(validate_config(cfg))
    assert base.keys() == switched.keys()
    for rid, spec in base.items():
        assert "fused_adam" not in spec["grid_cfg"] and "fused_adam" not in fit_config(spec)
        assert config_hash(switched[rid]) != config_hash(spec)  # a switched run is a new run (rounding-level change)
        for s, fused in ((spec, False), (switched[rid], True)):
            opt = build_optimizer(list(small_mlp().named_parameters()), fit_config(s))
            assert all(bool(g.get("fused")) == fused for g in opt.param_groups), (rid, fused)


def test_vit_redo_and_shrink_perturb_runs(tmp_path):
    cfg = copy.deepcopy(MINI)
    cfg["continual"]["grids"] = MORE_GRIDS
    specs = continual_specs(validate_config(cfg))
    for rid, spec in specs.items():
        row = run_continual(spec, tmp_path / rid, on_error="raise")
        assert row["status"] == "ok" and row["n_tasks"] == 2 and 0 <= row["dead_frac_end"] <= 1
    with duckdb.connect() as con:
        layers = {r[0] for r in con.execute(
            f"SELECT DISTINCT layer FROM read_parquet('{tmp_path}/**/continual_task_metrics.parquet')").fetchall()}
    assert {"blocks.0.attn.qkv.weight[0]", "blocks.0.attn.qkv.weight[2]", "blocks.0.mlp", "all"} <= layers


def test_run_records_a_failure_instead_of_crashing(tmp_path):
    spec = copy.deepcopy(next(iter(continual_specs(validate_config(MINI)).values())))
    spec["model"]["width"] = 0  # not a valid layer size
    row = run_continual(spec, tmp_path, on_error="record")
    assert row["status"] == "failed" and row["error"]


def test_continual_pipeline_end_to_end(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    (wd / "configs/mini.yaml").write_text(yaml.safe_dump(MINI))
    # this study's target alone (no pretraining job), then the aggregation of its runs in-process
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "configs/mini.yaml",
                           "--", "continual_runs"], cwd=wd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = continual_specs(validate_config(MINI))
    assert not aggregate(wd / "results", list(ids))  # every run ok
    with duckdb.connect(str(wd / "results/adaptlab.duckdb"), read_only=True) as con:
        assert {r[0] for r in con.execute("SELECT run_id FROM runs WHERE status = 'ok'").fetchall()} == set(ids)
        rows = con.execute("SELECT method, task, n_seeds, acc_mean, dead_frac_mean, ntk_cond_mean FROM continual_tasks "
                           "ORDER BY method, task").fetchall()
        assert len(rows) == 2 * 3
        assert all(r[2] == 1 and 0 <= r[3] <= 1 and 0 <= r[4] <= 1 for r in rows)
        assert [r[5] is not None for r in rows if r[0] == "adam"] == [True, False, True]  # tasks 0, 2 (and last)
        summ = con.execute("SELECT method, optimizer, n_ok, k_tasks, acc_first_mean, acc_last_mean, dead_end_mean "
                           "FROM continual_summary ORDER BY method").fetchall()
        assert [r[:4] for r in summ] == [("adam", "adam", 1, 1), ("adamo", "adamo", 1, 1)]
        assert all(0 <= v <= 1 for r in summ for v in r[4:])
    for fig in ("continual_accuracy", "continual_dead"):
        assert (wd / f"results/figures/{fig}.png").read_bytes()[:4] == b"\x89PNG"
    # the target of this study alone: nothing left to do
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "configs/mini.yaml",
                           "--", "continual_runs"], cwd=wd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stderr[-2000:]
