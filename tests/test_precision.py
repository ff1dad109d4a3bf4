"""``train.precision`` (adaptlab.train.device.uses_bf16): where the forward runs under bf16 autocast.

auto (left out) is bf16 on CUDA only, as before; bf16 puts the CPU under autocast too (configs/cpu.yaml); fp32
never. Checked here on the CPU: the switch itself, the config key, that a bf16 run is deterministic and differs
from its float32 twin only at bf16 rounding, that fused bf16 runs match the same runs one by one within that
rounding, that the explicit attention it selects computes what timm's fused kernel does, and that the key reaches
a run's params and fuse key only when it is set.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from adaptlab.config import ConfigError, config_hash, expand_runs, validate_config
from adaptlab.continual import specs as continual_specs
from adaptlab.continual.run import fit_config
from adaptlab.models.vit import create_vit
from adaptlab.runner import finetune_fuse_key, run_finetune, run_finetune_fused
from adaptlab.train.device import autocast, explicit_attention_for_cpu_bf16, uses_bf16
from conftest import REPO, TINY_MODEL, make_run
from test_continual import MINI

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(out) -> list[float]:
    return pq.read_table(out / "steps.parquet").to_pydict()["loss"]


def test_precision_says_where_the_forward_runs_in_bf16():
    cuda = torch.device("cuda")
    assert (uses_bf16(CPU), uses_bf16(cuda)) == (False, True)  # auto: as before this key existed
    assert (uses_bf16(CPU, "bf16"), uses_bf16(cuda, "bf16")) == (True, True)
    assert (uses_bf16(CPU, "fp32"), uses_bf16(cuda, "fp32")) == (False, False)
    with pytest.raises(ValueError, match="train.precision: 'fp16'"):
        uses_bf16(CPU, "fp16")
    a = torch.randn(4, 8)
    with autocast(CPU, "bf16"):
        assert (a @ a.T).dtype == torch.bfloat16
    with autocast(CPU):
        assert (a @ a.T).dtype == torch.float32


def test_an_unknown_precision_is_refused_naming_the_key():
    cfg = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    cfg["finetune"].setdefault("defaults", {})["precision"] = "fp16"
    with pytest.raises(ConfigError, match=r"finetune\.defaults\.precision.*fp16"):
        validate_config(cfg, source="cfg.yaml")


def test_precision_reaches_a_runs_params_and_fuse_key_only_when_set(tiny_data, tiny_pretrained):
    cfg = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    plain = [r.as_dict() for r in expand_runs(validate_config(copy.deepcopy(cfg)))]
    assert plain and all("precision" not in r["train"] for r in plain)  # runs that leave it out keep their params
    cfg["finetune"].setdefault("defaults", {})["precision"] = "bf16"
    bf16 = [r.as_dict() for r in expand_runs(validate_config(cfg))]
    assert all(r["train"]["precision"] == "bf16" for r in bf16)
    # the same runs, but a run's params (its rerun trigger) and config hash change
    assert [r["run_id"] for r in plain] == [r["run_id"] for r in bf16]
    assert all(config_hash(a) != config_hash(b) for a, b in zip(plain, bf16))
    a, b = make_run("full", ("*",), "sgd", 0.01, 0), make_run("full", ("*",), "sgd", 0.02, 0, precision="bf16")
    assert finetune_fuse_key(a, tiny_pretrained, tiny_data) != finetune_fuse_key(b, tiny_pretrained, tiny_data)
    # a continual grid's precision is its runs' train.precision
    mini = copy.deepcopy(MINI)
    grid = next(iter(mini["continual"]["grids"].values()))
    grid["precision"] = "bf16"
    spec = next(iter(continual_specs(validate_config(mini)).values()))
    assert fit_config(spec)["precision"] == "bf16"


def test_a_bf16_run_on_the_cpu_is_deterministic_and_within_bf16_rounding_of_float32(tiny_data, tiny_pretrained,
                                                                                     tmp_path):
    run32 = make_run("full", ("*",), "sgd", 0.01, 0)
    run16 = make_run("full", ("*",), "sgd", 0.01, 0, precision="bf16")
    r32 = run_finetune(run32, TINY_MODEL, tiny_pretrained, tiny_data, tmp_path / "fp32", device="cpu")
    first = run_finetune(run16, TINY_MODEL, tiny_pretrained, tiny_data, tmp_path / "bf16_a", device="cpu")
    again = run_finetune(run16, TINY_MODEL, tiny_pretrained, tiny_data, tmp_path / "bf16_b", device="cpu")
    assert first["status"] == again["status"] == r32["status"] == "ok"
    l32, la, lb = (_losses(tmp_path / d) for d in ("fp32", "bf16_a", "bf16_b"))
    assert la == lb and first["test_acc"] == again["test_acc"]  # the same config and seed, the same metrics
    assert la != l32  # autocast was on
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4 %); weights and updates stay float32. Measured:
    # 3e-4 apart at step 0, 1.7e-3 at most over the 12 steps
    assert la[0] == pytest.approx(l32[0], rel=4e-3)
    assert all(math.isfinite(x) for x in la) and max(abs(x - y) for x, y in zip(la, l32)) < 0.02


def test_fused_bf16_runs_match_the_same_runs_one_by_one_within_bf16_rounding(tiny_data, tiny_pretrained, tmp_path):
    runs = [make_run("full", ("*",), "sgd", 0.01, 0, precision="bf16"),
            make_run("mha", ("blocks.*.attn.*",), "sgd", 0.02, 1, precision="bf16"),
            make_run("head", (), "sgd", 0.05, 2, precision="bf16")]
    for r in runs:
        r["model"] = TINY_MODEL
    alone = [run_finetune(r, TINY_MODEL, tiny_pretrained, tiny_data, tmp_path / f"a{i}", device="cpu")
             for i, r in enumerate(runs)]
    fused = run_finetune_fused(runs, tiny_pretrained, tiny_data, [tmp_path / f"f{i}" for i in range(3)], device="cpu")
    for i, (a, f) in enumerate(zip(alone, fused)):
        assert a["status"] == f["status"] == "ok"
        la, lf = _losses(tmp_path / f"a{i}"), _losses(tmp_path / f"f{i}")
        # the same weights and batches; bf16 rounds the batched and the single products apart (measured: 1.2e-7 at
        # step 0, 3e-5 at most over the 12 steps)
        assert la[0] == pytest.approx(lf[0], abs=1e-5)
        assert max(abs(x - y) for x, y in zip(la, lf)) < 1e-3


def test_the_explicit_attention_under_cpu_bf16_computes_what_the_fused_kernel_does():
    torch.manual_seed(0)
    fused = create_vit(TINY_MODEL, num_classes=4)
    explicit = copy.deepcopy(fused)
    explicit_attention_for_cpu_bf16(explicit, CPU, "auto")  # float32 on the CPU: the fused kernel stays
    assert all(m.fused_attn for m in explicit.modules() if hasattr(m, "fused_attn"))
    explicit_attention_for_cpu_bf16(explicit, CPU, "bf16")
    attns = [m for m in explicit.modules() if hasattr(m, "fused_attn")]
    assert attns and not any(m.fused_attn for m in attns)
    x = torch.randn(6, 3, 16, 16)
    out_f, out_e = fused(x), explicit(x)
    torch.testing.assert_close(out_e, out_f, rtol=1e-5, atol=1e-5)
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    for (name, pf), pe in zip(fused.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(pe.grad, pf.grad, rtol=1e-4, atol=1e-5, msg=name)


def switch():
    """torch's switch that routes float32 matmuls to oneDNN; None in an older torch (pyproject allows >= 2.3) that
    lacks it, where the contexts change nothing."""
    return getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)


def test_a_fused_groups_onednn_matmuls_stay_float32_and_the_switch_is_scoped():
    """``onednn_float32_matmul`` (a fused group's step on the CPU): where it routes float32 matmuls to oneDNN
    (``onednn_float32_is_exact``), the products stay within float32 rounding of float64 for the preset group's
    shapes; it restores torch's switch on leaving, also on an error; off the CPU it changes nothing."""
    from adaptlab.train.device import onednn_float32_is_exact, onednn_float32_matmul

    before = switch()
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(18, 512, 32, generator=g), torch.randn(18, 32, 96, generator=g)),
             (torch.randn(18, 96, 512, generator=g), torch.randn(18, 512, 32, generator=g)),
             (torch.randn(576, 16, 16, generator=g), torch.randn(576, 16, 16, generator=g)),
             (torch.randn(9, 128, 128, generator=g), torch.randn(9, 128, 128, generator=g))]
    with onednn_float32_matmul(CPU):
        inside = switch()
        products = [torch.bmm(a, b) for a, b in pairs]
    assert switch() == before
    assert inside == ("bf16" if onednn_float32_is_exact() else before)  # torch's name for "oneDNN may take it"
    for (a, b), out in zip(pairs, products):
        want = torch.bmm(a.double(), b.double())
        assert out.dtype == torch.float32
        assert (out.double() - want).abs().max() < 1e-5 * want.abs().max()  # bf16 products: ~4e-3

    with pytest.raises(RuntimeError, match="inside"):
        with onednn_float32_matmul(CPU):
            raise RuntimeError("inside")
    assert switch() == before
    with onednn_float32_matmul(torch.device("meta")):
        assert switch() == before


def test_the_grouped_attention_takes_torchs_default_matmuls_inside_a_groups_onednn_switch():
    """``default_float32_matmul`` (the grouped attention's products: MKL, faster than oneDNN for its many 16 × 16
    matrices) turns the switch back to torch's default inside ``onednn_float32_matmul`` and restores it on leaving;
    the attention's output and gradient are then those it gives outside the switch, bit for bit."""
    from adaptlab.train.device import default_float32_matmul, onednn_float32_is_exact, onednn_float32_matmul
    from adaptlab.train.grouped import attention

    before = switch()
    with onednn_float32_matmul(CPU):
        outer = switch()
        with default_float32_matmul():
            assert switch() == ("none" if onednn_float32_is_exact() else before)
        assert switch() == outer
    assert switch() == before

    g = torch.Generator().manual_seed(2)
    qkv, grad = torch.randn(6, 8, 16, 96, generator=g), torch.randn(6, 8, 16, 32, generator=g)
    results = []
    for inside in (False, True):
        x = qkv.clone().requires_grad_()
        with onednn_float32_matmul(CPU) if inside else contextlib.nullcontext():
            out = attention(x, 2, 0.25)
            out.backward(grad)
        results.append((out.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
