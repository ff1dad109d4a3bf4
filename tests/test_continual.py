"""Study 5: AdamO invariants (shared/papers/adamo.md §5), the plasticity metrics, the registry/fit extensions
and a tiny end-to-end continual pipeline."""
from __future__ import annotations

import copy
import subprocess
import sys

import warnings

import duckdb
import pytest
import torch
import torch.nn as nn
import yaml

from adaptlab.aggregate import aggregate
from adaptlab.config import ConfigError, expand_runs, train_config, validate_config
from adaptlab.continual import bench, metrics, specs as continual_specs
from adaptlab.continual.run import run_continual
from adaptlab.models.vit import create_vit
from adaptlab.train.adamo import (AdamO, coupled_isometry_loss, gram_deviation, isometry_grad, isometry_param_groups,
                                  isometry_penalty, select_isometry)
from adaptlab.train.loop import fit
from adaptlab.train.optim import build_optimizer
from conftest import TINY_MODEL, copy_workflow, make_run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny ops: extra threads only add contention on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return bench.MLP(8, 16, 2, 4)


def _grads(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(n)]


def _run(model, opt, grads):
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g.clone()
        opt.step()


def test_lambda_zero_is_adam_bit_for_bit():
    x = torch.randn(64, 8)
    y = torch.randint(4, (64,))
    a, b = _mlp(), _mlp()
    oa = AdamO(a.parameters(), lr=3e-3, isometry_lambda=0.0)
    ob = torch.optim.Adam(b.parameters(), lr=3e-3, foreach=False)
    for _ in range(200):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(oa.state[pa]["exp_avg"], ob.state[pb]["exp_avg"])
        assert torch.equal(oa.state[pa]["exp_avg_sq"], ob.state[pb]["exp_avg_sq"])
    # λ > 0 with nothing regularised (biases only: 1-D) is Adam too
    c, d = _mlp(), _mlp()
    bias = lambda m: [p for n, p in m.named_parameters() if n.endswith("bias")]
    oc, od = AdamO(bias(c), lr=1e-2, isometry_lambda=0.1), torch.optim.Adam(bias(d), lr=1e-2, foreach=False)
    grads = _grads(c, 20)
    for o, m in ((oc, c), (od, d)):
        for gs in grads:
            for (n, p), g in zip(m.named_parameters(), gs):
                p.grad = g.clone() if n.endswith("bias") else None
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))


def test_moments_do_not_depend_on_lambda_and_the_step_is_exactly_iso():
    grads = _grads(_mlp(), 30)
    models, opts = [], []
    for lam in (0.0, 0.1):
        m = _mlp()
        o = AdamO(m.parameters(), lr=1e-2, isometry_lambda=lam)
        _run(m, o, grads)
        models.append(m), opts.append(o)
    for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opts[0].state[p0][key], opts[1].state[p1][key])
    # one step: the parameters differ by exactly −η·λ·∇R(θ_t)
    m0, m1 = _mlp(), _mlp()
    w = m1.layers[0].weight.detach().clone()
    _run(m0, AdamO(m0.parameters(), lr=1e-2, isometry_lambda=0.0), grads[:1])
    _run(m1, AdamO(m1.parameters(), lr=1e-2, isometry_lambda=0.1), grads[:1])
    torch.testing.assert_close(m1.layers[0].weight - m0.layers[0].weight, -1e-2 * 0.1 * isometry_grad(w),
                               rtol=1e-4, atol=1e-7)
    # the coupled variant puts the penalty through the moments, so they differ
    mc = _mlp()
    oc = torch.optim.Adam(mc.parameters(), lr=1e-2, foreach=False)
    for gs in grads[:3]:
        oc.zero_grad()
        coupled_isometry_loss(mc.named_parameters(), 0.1, exclude=["head*"]).backward()
        for p, g in zip(mc.parameters(), gs):
            p.grad = g.clone() if p.grad is None else p.grad + g
        oc.step()
    m_ref = _mlp()
    o_ref = AdamO(m_ref.parameters(), lr=1e-2, isometry_lambda=0.1)
    _run(m_ref, o_ref, grads[:3])
    assert not torch.equal(oc.state[mc.layers[0].weight]["exp_avg"], o_ref.state[m_ref.layers[0].weight]["exp_avg"])


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_one_step_maps_singular_values_and_keeps_vectors(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64) / shape[1] ** 0.5
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    p = nn.Parameter(w.clone())
    opt = AdamO([p], lr=0.01, isometry_lambda=0.5)
    p.grad = torch.zeros_like(p)  # task gradient 0: Adam's part is exactly 0, only the iso step moves W
    opt.step()
    coeff = 0.01 * 0.5
    s_new = s - 4 * coeff * s * (s ** 2 - 1)
    torch.testing.assert_close(p.detach(), u @ torch.diag(s_new) @ vh, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(p.detach()), s_new.sort(descending=True).values, atol=1e-12, rtol=0)
    # repeated small steps: the Gram deviation falls strictly, to ~0
    devs = [gram_deviation(p)]
    for _ in range(300):
        p.grad = torch.zeros_like(p)
        opt.step()
        devs.append(gram_deviation(p))
    assert all(b < a for a, b in zip(devs, devs[1:]))
    assert devs[-1] < 1e-2 * devs[0]  # all σ → 1 (the square case's σ_min ≈ 0 starts slowly)


def test_shape_rule_and_gradient():
    torch.manual_seed(0)
    for shape in [(12, 5), (5, 12), (7, 7), (6, 2, 3, 3)]:
        w = torch.randn(*shape, requires_grad=True)
        m = w.reshape(shape[0], -1)
        gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        assert gram.shape == (min(m.shape),) * 2
        isometry_penalty(w).backward()
        torch.testing.assert_close(isometry_grad(w), w.grad, rtol=1e-5, atol=1e-5)
        assert isometry_grad(w).shape == w.shape
    # orthogonal tall/wide matrices are fixed points; zero stays zero
    for shape in [(12, 5), (5, 12)]:
        w = nn.init.orthogonal_(torch.empty(*shape))
        assert isometry_penalty(w).item() < 1e-10
        assert isometry_grad(w).abs().max().item() < 1e-5
    assert torch.equal(isometry_grad(torch.zeros(4, 6)), torch.zeros(4, 6))
    # fused qkv: the 3 row blocks separately; a conv kernel equals its (C_out, -1) view
    qkv = torch.randn(24, 8)
    torch.testing.assert_close(isometry_grad(qkv, split=3), torch.cat([isometry_grad(b) for b in qkv.chunk(3)]))
    k = torch.randn(6, 2, 3, 3)
    torch.testing.assert_close(isometry_grad(k), isometry_grad(k.reshape(6, -1)).reshape(k.shape))


def test_selection_by_name_on_a_vit():
    vit = create_vit(TINY_MODEL, 4)
    chosen = select_isometry(vit.named_parameters())
    assert chosen["blocks.0.attn.qkv.weight"] == 3 and chosen["blocks.1.mlp.fc2.weight"] == 1
    assert not any(n.startswith(("head", "patch_embed", "norm")) or "norm" in n or n.endswith("bias") for n in chosen)
    assert "pos_embed" not in chosen and "cls_token" not in chosen
    groups = isometry_param_groups(vit.named_parameters(), 0.01)
    assert [g["isometry_split"] for g in groups] == [1, 3, 1] and groups[-1]["isometry_lambda"] == 0.0


def test_per_group_lambda_lr_and_schedule():
    torch.manual_seed(0)
    w0 = torch.randn(6, 4)

    def iso_move(**group):
        p = nn.Parameter(w0.clone())
        opt = AdamO([{"params": [p], **group}], lr=0.1, isometry_lambda=0.0)
        p.grad = torch.zeros_like(p)
        opt.step()
        return p.detach() - w0, opt

    ref = -isometry_grad(w0)
    torch.testing.assert_close(iso_move(isometry_lambda=0.01)[0], 0.1 * 0.01 * ref)
    torch.testing.assert_close(iso_move(isometry_lambda=0.01, lr=0.05)[0], 0.05 * 0.01 * ref)
    torch.testing.assert_close(iso_move(isometry_lambda=0.01, isometry_lr=0.3)[0], 0.3 * 0.01 * ref)
    assert torch.equal(iso_move(isometry_lambda=0.0)[0], torch.zeros_like(w0))
    # a scheduler that halves the lr halves the iso step (η_iso follows the group's current lr)
    p = nn.Parameter(w0.clone())
    opt = AdamO([p], lr=0.1, isometry_lambda=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    sched.step()
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach() - before, 0.05 * 0.01 * -isometry_grad(before))


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_round_trip(fused):
    grads = _grads(_mlp(), 100)

    def adamo(model):
        return AdamO(isometry_param_groups(model.named_parameters(), 0.05, exclude=["head*"]), lr=1e-2, fused=fused)

    a = _mlp()
    oa = adamo(a)
    _run(a, oa, grads)
    b = _mlp()
    ob = adamo(b)
    _run(b, ob, grads[:50])
    model_sd, opt_sd = copy.deepcopy(b.state_dict()), copy.deepcopy(ob.state_dict())
    assert opt_sd["param_groups"][0]["isometry_lambda"] == 0.05 and "isometry_lr" in opt_sd["param_groups"][0]
    c = _mlp(seed=5)
    oc = adamo(c)
    c.load_state_dict(model_sd)
    oc.load_state_dict(copy.deepcopy(opt_sd))  # torch keeps the loop's step tensors, which the steps advance
    _run(c, oc, grads[50:])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    if not fused:  # a checkpoint written before AdamO had the fused key resumes on the loop, bit for bit
        for g in opt_sd["param_groups"]:
            del g["fused"]
        d = _mlp(seed=6)
        od = adamo(d)
        d.load_state_dict(model_sd)
        od.load_state_dict(opt_sd)
        _run(d, od, grads[50:])
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), d.parameters()))


def test_fused_adamo_steps_like_the_loop():
    """AdamO(fused=True): torch's fused Adam kernel for the Adam part, the same isometry steps; equal to the loop
    at rounding level."""
    grads = _grads(_mlp(), 60)
    a, b = _mlp(), _mlp()
    _run(a, AdamO(isometry_param_groups(a.named_parameters(), 0.1), lr=1e-2), grads)
    _run(b, AdamO(isometry_param_groups(b.named_parameters(), 0.1), lr=1e-2, fused=True), grads)
    start = _mlp()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        assert (p - p0).abs().max() > 1e-2
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_bad_lambda_and_patterns_are_rejected():
    m = _mlp()
    for lam in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="isometry_lambda"):
            AdamO(m.parameters(), isometry_lambda=lam)
    with pytest.raises(ValueError, match="isometry_lambda"):
        AdamO([{"params": list(m.parameters()), "isometry_lambda": -1.0}])
    with pytest.raises(ValueError, match=r"isometry_patterns: \['blocks\.\*'\] match no parameter"):
        isometry_param_groups(m.named_parameters(), 0.1, patterns=["blocks.*"])
    with pytest.raises(ValueError, match="isometry_patterns"):
        select_isometry(m.named_parameters(), patterns="layers.*")
    with pytest.raises(ValueError, match="named_parameters"):
        build_optimizer(m.parameters(), train_config({"optimizer": "adamo"}))
    # an iso step that cannot be stable is announced
    w = nn.Parameter(torch.full((4, 4), 3.0))
    opt = AdamO([w], lr=1.0, isometry_lambda=1.0)
    w.grad = torch.zeros_like(w)
    with pytest.warns(RuntimeWarning, match="unstable"):
        opt.step()


def test_adamo_checks_the_iso_step_bound_at_the_first_step_and_every_stability_every_th():
    """The bound costs a host sync per matrix, so it is not read at every step: a matrix that becomes unstable
    after the first step is announced at the next check."""
    from adaptlab.train.adamo import STABILITY_EVERY

    w = nn.Parameter(torch.eye(4) * 0.1)
    opt = AdamO([w], lr=0.01, isometry_lambda=1.0)  # η_iso·λ = 0.01: stable at 0.1·I, not at all 3s
    w.grad = torch.zeros_like(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # checked: stable
        with torch.no_grad():
            w.fill_(3.0)
        for _ in range(STABILITY_EVERY - 1):  # unstable now, not checked
            opt.step()
            with torch.no_grad():
                w.fill_(3.0)
    with pytest.warns(RuntimeWarning, match="unstable"):
        opt.step()


def test_unit_and_spectral_metrics_on_constructed_networks():
    m = _mlp()
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


def test_entk_condition_of_a_multi_tensor_model_matches_the_full_jacobian():
    """Θ is summed tensor by tensor; it must equal JJᵀ of the whole Jacobian, here built row by row with autograd."""
    m, x = _mlp(), torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    params = list(m.parameters())
    out = m(x)
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(out[i, c], params, retain_graph=True)])
            for i in range(out.shape[0]) for c in range(out.shape[1])]
    j = torch.stack(rows).double()
    ev = torch.linalg.eigvalsh(j @ j.T).clamp_min(1e-12)
    assert len(params) > 2
    assert metrics.entk_condition(m, x) == pytest.approx((ev[-1] / ev[0]).item(), rel=1e-6)


def test_redo_resets_dormant_units_and_their_moments():
    m = _mlp()
    opt = AdamO(m.parameters(), lr=1e-2, isometry_lambda=0.0)
    _run(m, opt, _grads(m, 2))
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:3] = True
    n = bench.redo_reset(m, _mlp(seed=9), opt, {"layers.0": mask})
    assert n == 3
    assert torch.equal(m.layers[1].weight[:, :3], torch.zeros(16, 3))
    assert (opt.state[m.layers[0].weight]["exp_avg"][:3] == 0).all()
    assert (opt.state[m.layers[0].weight]["exp_avg"][3:] != 0).any()


def test_fit_carries_an_optimizer_across_tasks(tmp_path):
    x, _, _ = bench.load_inputs({"inputs": "gaussian", "n": 64, "dim": 8}, 0)
    m = _mlp()
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
            opt = build_optimizer(list(_mlp().named_parameters()), fit_config(s))
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
