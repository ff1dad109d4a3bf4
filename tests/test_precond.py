"""Preconditioned attention: equivalence with timm, the properties of C, the kappa bound and measurement, the
config key, and a tiny end-to-end run of the precond study (runs, raw tables, SQL tables, figures)."""
from __future__ import annotations

import copy
import math
import subprocess
import sys

import duckdb
import numpy as np
import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from adaptlab.config import ConfigError, backbone_spec, validate_config
from adaptlab.models.precond_attention import (PreconditionedAttention, condition_number, conditioner, head_outputs,
                                               precondition, preconditioned_attention)
from adaptlab.models.vit import create_vit
from conftest import TINY_MODEL, copy_workflow

DIM, HEADS = 32, 4  # d_h = 8


def pair(qk_norm=False, **opts):
    """A timm Attention and a PreconditionedAttention with the same weights (strict load)."""
    torch.manual_seed(0)
    kw = dict(num_heads=HEADS, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm if qk_norm else None)
    ref = Attention(DIM, **kw).eval()
    pre = PreconditionedAttention(DIM, **kw, **opts).eval()
    pre.load_state_dict(ref.state_dict(), strict=True)
    return ref, pre


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_c_off_equals_timm_attention(fused, qk_norm, masked):
    ref, pre = pair(qk_norm=qk_norm, precond=False)
    ref.fused_attn = pre.fused_attn = fused
    x = torch.randn(3, 7, DIM)
    mask = torch.randn(3, 1, 7, 7) if masked else None
    with torch.no_grad():
        assert torch.allclose(pre(x, attn_mask=mask), ref(x, attn_mask=mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", ["col", "row"])
def test_fused_and_unfused_preconditioned_paths_agree(form):
    _, pre = pair(form=form)
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        pre.fused_attn = True
        a = pre(x)
        pre.fused_attn = False
        b = pre(x)
    assert a.shape == (2, 9, DIM)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_c_positive_finite_and_norms():
    o = torch.randn(2, HEADS, 11, 8) * torch.logspace(-3, 3, 8)  # anisotropic channels
    for form, dim, target in (("col", -2, math.sqrt(11)), ("row", -1, math.sqrt(8))):
        c = conditioner(o, form)
        assert torch.isfinite(c).all() and (c > 0).all()
        assert c.shape == ((2, HEADS, 1, 8) if form == "col" else (2, HEADS, 11, 1))
        norms = torch.linalg.vector_norm(precondition(o, form), dim=dim)
        raw = torch.linalg.vector_norm(o, dim=dim)
        n = o.shape[dim]  # C = 1 / sqrt(mean(o^2) + eps^2) = target / sqrt(||o||^2 + n eps^2)
        assert torch.allclose(norms, target * raw / torch.sqrt(raw ** 2 + n * 1e-12), rtol=1e-5)
        assert torch.allclose(norms, torch.full_like(norms, target), rtol=1e-3)


def _scale_v(attn: Attention, factor, channel=None):
    """Multiply W_v (and its bias) by ``factor``: every value channel, or only ``channel`` of every head."""
    with torch.no_grad():
        rows = slice(2 * DIM, 3 * DIM) if channel is None else torch.arange(2 * DIM + channel, 3 * DIM, DIM // HEADS)
        attn.qkv.weight[rows] *= factor
        attn.qkv.bias[rows] *= factor


@pytest.mark.parametrize("form", ["col", "row"])
def test_invariant_to_scaling_v(form):
    _, pre = pair(form=form)
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        before = pre(x)
        _scale_v(pre, 37.0)
        assert torch.allclose(pre(x), before, atol=1e-5)
        if form == "col":  # a single value channel too: C equilibrates every channel separately
            _scale_v(pre, 0.01, channel=3)
            assert torch.allclose(pre(x), before, atol=1e-4)


def test_col_kappa_bound_van_der_sluis():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 24, 6, generator=g, dtype=torch.float64)
    a = a * 10 ** (3 * torch.rand(200, 1, 6, generator=g, dtype=torch.float64))  # some draws anisotropic
    k_pre, k_post = condition_number(a), condition_number(precondition(a, "col", eps=1e-12))
    assert (k_post <= math.sqrt(6) * k_pre * (1 + 1e-9)).all()
    # on strongly anisotropic columns the reduction is large (never assert it on generic inputs)
    aniso = torch.randn(50, 24, 6, generator=g, dtype=torch.float64) * torch.logspace(0, 3, 6, dtype=torch.float64)
    assert (condition_number(precondition(aniso, "col", eps=1e-12)) < 0.2 * condition_number(aniso)).all()


@pytest.mark.parametrize("form", ["col", "row"])
def test_zero_inputs_give_finite_outputs(form):
    _, pre = pair(form=form)
    with torch.no_grad():
        assert torch.isfinite(pre(torch.zeros(2, 5, DIM))).all()
        for p in pre.parameters():
            p.zero_()  # q = k = v = 0: every channel and token norm is 0, eps guards 0/0
        assert torch.isfinite(pre(torch.randn(2, 5, DIM))).all()


@pytest.mark.parametrize("form,detach", [("col", False), ("row", False), ("col", True)])
def test_gradients_finite_and_gradcheck(form, detach):
    torch.manual_seed(0)
    attn = PreconditionedAttention(6, num_heads=2, qkv_bias=True, form=form, detach=detach).double()  # d_h = 3
    attn.fused_attn = False
    x = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    if not detach:  # a detached C is by design not the derivative of the forward, so gradcheck does not apply
        assert torch.autograd.gradcheck(lambda t: attn(t), (x,), eps=1e-6, atol=1e-5)
        attn.fused_attn = True
        assert torch.autograd.gradcheck(lambda t: attn(t), (x,), eps=1e-6, atol=1e-5)
    attn.float()
    attn(torch.randn(2, 5, 6)).square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_detach_changes_the_gradient_not_the_output():
    torch.manual_seed(0)
    a = PreconditionedAttention(DIM, num_heads=HEADS, detach=False)
    b = PreconditionedAttention(DIM, num_heads=HEADS, detach=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, DIM)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert not torch.allclose(a.qkv.weight.grad, b.qkv.weight.grad)
    # detached: the gradient w.r.t. A is C itself (C a constant)
    o = torch.randn(2, 3, 6, 4, requires_grad=True)
    precondition(o, "col", detach=True).sum().backward()
    assert torch.allclose(o.grad, conditioner(o.detach(), "col").expand_as(o))


def test_condition_number_matches_numpy():
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = rng.standard_normal((rng.integers(4, 30), 4)) * 10 ** rng.uniform(0, 3, 4)
        assert np.isclose(condition_number(torch.from_numpy(m)).item(), np.linalg.cond(m), rtol=1e-8)
    assert condition_number(torch.eye(5)).item() == pytest.approx(1.0)
    tall = torch.zeros(6, 3, dtype=torch.float64)
    tall[:3] = torch.diag(torch.tensor([1.0, 10.0, 100.0]))
    assert condition_number(tall).item() == pytest.approx(100.0)
    rank1 = torch.ones(6, 3, dtype=torch.float64)
    assert condition_number(rank1).item() > 1e12  # huge or the cap


def test_col_refuses_causal_and_bad_options():
    _, pre = pair()
    with pytest.raises(ValueError, match="leaks future"):
        pre(torch.randn(1, 4, DIM), is_causal=True)
    with pytest.raises(ValueError, match="form"):
        preconditioned_attention(form="both")
    with pytest.raises(ValueError, match="eps"):
        PreconditionedAttention(DIM, num_heads=HEADS, eps=0.0)


def test_create_vit_option_loads_timm_weights_strictly_and_same_init():
    cfg = {**TINY_MODEL, "attention": {"kind": "preconditioned", "form": "row", "detach": True}}
    torch.manual_seed(3)
    model = create_vit(cfg, 5)
    torch.manual_seed(3)
    plain = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=5, qkv_bias=True)
    assert all(isinstance(b.attn, PreconditionedAttention) and b.attn.form == "row" and b.attn.detach
               for b in model.blocks)
    # no new parameters and the same initialisation for the same seed: the state dicts are equal
    sd, ref = model.state_dict(), plain.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    model.load_state_dict(plain.state_dict(), strict=True)
    assert type(create_vit(TINY_MODEL, 5).blocks[0].attn) is Attention  # no key = timm's


def _base_config(**extra) -> dict:
    return {"datasets": {"src": {"kind": "procedural", "classes": 4, "image_size": 16, "n_train": 64, "n_val": 16,
                                 "n_test": 16},
                         "tgt": {"kind": "procedural", "classes": 3, "image_size": 16, "n_train": 64, "n_val": 16,
                                 "n_test": 16, "seed": 1}},
            "model": {k: v for k, v in TINY_MODEL.items() if k != "timm_name"},
            "pretrain": {"dataset": "src", "train": {"optimizer": "adamw", "lr": 3e-3, "steps": 6, "batch_size": 16,
                                                     "eval_every": 3, "ckpt_every": 0}},
            "finetune": {"grids": {"g": {"datasets": ["tgt"], "seeds": [0], "lrs": [0.01]}}}, **extra}


def test_config_key_and_backbone_arm():
    cfg = validate_config(_base_config(backbones={"precond_col": {"model": {"attention": {"kind": "preconditioned"}}}}))
    assert cfg["model"]["attention"] == {"kind": "timm", "form": "col", "eps": 1e-6, "detach": False}
    spec = backbone_spec(cfg, "precond_col")["model"]
    assert spec["attention"] == {"kind": "preconditioned", "form": "col", "eps": 1e-6, "detach": False}
    assert isinstance(create_vit(spec, 3).blocks[0].attn, PreconditionedAttention)
    with pytest.raises(ConfigError, match=r"model\.attention\.form"):
        validate_config(_base_config(model={**TINY_MODEL, "timm_name": None, "attention": {"form": "diag"}}))


def test_precond_section_errors():
    from adaptlab.precond import specs

    assert not [r for r in specs(validate_config(_base_config())) if r.startswith("precond")]
    with pytest.raises(ConfigError, match=r"precond\.finetune\.dataset"):
        specs(validate_config(_base_config(precond={"finetune": {"dataset": "nope"}})))
    with pytest.raises(ConfigError, match=r"precond\.finetune\.dataset: required"):
        specs(validate_config(_base_config(precond={})))
    with pytest.raises(ConfigError, match=r"precond\.baseline"):
        specs(validate_config(_base_config(precond={"finetune": {"dataset": "tgt"}, "baseline": "timm"})))
    with pytest.raises(ConfigError, match=r"precond\.probe\.every"):
        validate_config(_base_config(precond={"probe": {"every": 0}}))


def test_probe_kappas():
    from adaptlab.precond.run import attention_kappas

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    col = create_vit({**TINY_MODEL, "attention": {"kind": "preconditioned"}}, 3)
    base = create_vit(TINY_MODEL, 3)
    rows = attention_kappas(col, x)
    assert [(l, h) for l, h, *_ in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    d_h = TINY_MODEL["embed_dim"] // TINY_MODEL["num_heads"]
    assert all(1 <= post <= math.sqrt(d_h) * pre * (1 + 1e-6) for *_, pre, post in rows)
    assert all(pre == post for *_, pre, post in attention_kappas(base, x))
    # the per-image kappas are those of head_outputs on the block's input
    blk = col.blocks[0]
    with torch.no_grad():
        inp = blk.norm1(col.norm_pre(col._pos_embed(col.patch_embed(x))))
        direct = condition_number(head_outputs(copy.deepcopy(blk.attn).double(), inp.double()))
    assert rows[0][2] == pytest.approx(10 ** direct[:, 0].log10().mean().item(), rel=1e-6)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The precond study at toy size: 2 arms × 2 seeds × 2 phases + timing, run and aggregated in-process."""
    from adaptlab.aggregate import aggregate
    from adaptlab.data.prepare import prepare_dataset
    from adaptlab.precond import TIMING_RUN, specs as precond_specs
    from adaptlab.precond.run import run_precond, run_timing
    from adaptlab.runner import run_pretrain
    from adaptlab.config import pretrain_spec
    from adaptlab.studies import expected_run_ids

    root = tmp_path_factory.mktemp("precond")
    finetune = {"steps": 8, "batch_size": 16, "eval_every": 4, "optimizer": "adamw", "lr": 3e-3}
    raw = _base_config(precond={
        "arms": {"baseline": {"kind": "timm"}, "col": {"kind": "preconditioned"}}, "seeds": [0, 1],
        "pretrain": {"train": {"steps": 12}}, "finetune": {"dataset": "tgt", "train": finetune},
        "probe": {"every": 4, "batch_size": 8}, "ema": 0.5, "timing": {"steps": 2, "repeats": 2, "batch_size": 4}})
    cfg = validate_config(raw)
    res = root / "results"
    for name, ds in cfg["datasets"].items():
        prepare_dataset(name, ds, res / "data" / f"{name}.safetensors")
    run_pretrain(pretrain_spec(cfg), res / "data/src.safetensors", res / "runs/pretrain/base", device="cpu")
    specs = precond_specs(cfg)
    for rid, spec in specs.items():
        if rid == TIMING_RUN:
            run_timing(spec, res / "runs" / rid)
        else:
            run_precond(spec, res / "data" / f"{spec['dataset']}.safetensors",
                        res / "runs/pretrain/base/model.safetensors", res / "runs" / rid, device="cpu")
    not_ok = aggregate(res, [r for r in expected_run_ids(cfg) if not r.startswith("g/")])
    return res, specs, not_ok


def test_study_end_to_end(study):
    res, specs, not_ok = study
    assert not_ok == []
    with duckdb.connect(str(res / "adaptlab.duckdb"), read_only=True) as con:
        summary = con.execute("SELECT phase, arm, n_ok, loss_q1_mean, loss_end_mean, val_acc_mean, "
                              "log10_kappa_pre_mean, log10_kappa_post_mean, sec_per_step, overhead_pct "
                              "FROM precond_summary ORDER BY ALL").fetchall()
        assert [(p, a, n) for p, a, n, *_ in summary] == [("finetune", "baseline", 2), ("finetune", "col", 2),
                                                         ("pretrain", "baseline", 2), ("pretrain", "col", 2)]
        for phase, arm, _, q1, end, acc, kpre, kpost, sec, over in summary:
            assert (end < q1 if phase == "pretrain" else math.isfinite(end)) and 0 <= acc <= 1 and sec > 0
            assert (kpost == kpre) if arm == "baseline" else (kpost <= kpre + 0.5 * math.log10(16) + 1e-9)
            assert over == 0 if arm == "baseline" else math.isfinite(over)
        # per (run, probe step): every layer and head, the col bound holds at every logged step
        rows = con.execute("SELECT r.precond_arm, count(DISTINCT c.step), count(*), "
                           "bool_and(c.kappa_post <= 4 * c.kappa_pre * (1 + 1e-9)) "  # d_h = 16
                           "FROM attention_condition c JOIN runs r USING (run_id) "
                           "WHERE r.precond_phase = 'pretrain' GROUP BY 1 ORDER BY 1").fetchall()
        # probe steps 0, 4, 8, 12 × 2 layers × 2 heads × 2 seeds
        assert rows == [("baseline", 4, 4 * 2 * 2 * 2, True), ("col", 4, 4 * 2 * 2 * 2, True)]
        # identical init and data order: at step 0 both arms see the same A (kappa_pre) for each seed
        same = con.execute("SELECT count(DISTINCT c.kappa_pre) FROM attention_condition c JOIN runs r USING (run_id) "
                           "WHERE c.step = 0 AND r.seed = 0 AND r.precond_phase = 'pretrain' "
                           "AND c.layer = 0 AND c.head = 0").fetchone()[0]
        assert same == 1
        thr = con.execute("SELECT arm, steps_to_threshold FROM precond_runs WHERE phase = 'pretrain'").fetchall()
        assert all(s is None or 1 <= s <= 12 for _, s in thr) and any(s is not None for a, s in thr if a == "baseline")
    for fig in ("precond_loss_curves", "precond_kappa"):
        assert (res / f"figures/{fig}.png").read_bytes()[:4] == b"\x89PNG"


def test_snakemake_plans_the_study(tmp_path):
    import yaml

    wd = copy_workflow(tmp_path)
    cfg = _base_config(precond={"finetune": {"dataset": "tgt"}, "seeds": [0]})
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "precond_runs", "-n", "--cores", "1", "--configfile",
                           "c.yaml"], cwd=wd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("rule precond_train:") == 8 and "rule precond_timing:" in out
    assert "results/runs/precond/finetune/col_detached/seed0/summary.parquet" in out
