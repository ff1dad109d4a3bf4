"""Grouped forwards (adaptlab.train.grouped): a fused pack's model over its runs' stacked weights equals each run's
own model (float64, to rounding), and a group's step through it equals the vmapped step. The continual MLP and
tiny ViT: tests/test_fused_continual.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from adaptlab.data.store import load_dataset
from adaptlab.icl.model import ICLTransformer
from adaptlab.runner import build_finetune
from adaptlab.train.fused import FusedRuns
from adaptlab.train.grouped import grouped_forward
from conftest import TINY_MODEL, make_run

CPU = torch.device("cpu")


def test_grouped_class_token_vit_equals_each_model_and_the_vmapped_step(tiny_data, tiny_pretrained):
    """The finetuning ViT (class token, token pooling; its last block trimmed to the class token's row) through the
    grouped forward = each run's own model in float64; a group whose trainable sets leave weights to a span of its
    runs (train.grouped: ``grad_runs``) steps as the vmapped group does: losses, gradient norms and gradients."""
    data = load_dataset(tiny_data)
    # runs 0 and 3 train only the head; the attention weights train in runs 1-2, the MLP's in run 2
    runs = [make_run("head", (), "sgd", 0.01, 0), make_run("mha", ("blocks.*.attn.*",), "sgd", 0.02, 1),
            make_run("full", ("*",), "sgd", 0.03, 2), make_run("head", (), "sgd", 0.05, 3)]
    built = [build_finetune({**r, "model": TINY_MODEL}, TINY_MODEL, tiny_pretrained, data, CPU) for r in runs]
    models64 = [copy.deepcopy(m).double().eval() for m, _ in built]
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models64])
               for k, _ in models64[0].named_parameters()}
    x = torch.randn(4, 5, 3, 16, 16, dtype=torch.float64)
    forward = grouped_forward(models64[0])
    want = torch.stack([m(x[r]) for r, m in enumerate(models64)])
    assert torch.allclose(forward(models64[0], stacked, x), want, rtol=1e-10, atol=1e-12)

    group = FusedRuns([m for m, _ in built], [t for _, t in built], [r["lr"] for r in runs], runs[0]["train"], CPU)
    assert group._grouped_loss
    assert group.params["blocks.0.attn.qkv.weight"].grad_runs == (1, 3)
    assert group.params["blocks.1.mlp.fc1.bias"].grad_runs == (2, 3)
    results = []
    for grouped in (True, False):
        group._grouped_loss = grouped
        loss, values = group.losses(0, 16)
        norms = group.backward_clip(loss, values, math.inf)
        results.append((values, norms, {k: p.grad.clone() for k, p in group.params.items() if p.grad is not None}))
    (v_g, n_g, g_g), (v_v, n_v, g_v) = results
    assert v_g == pytest.approx(v_v, rel=1e-5) and n_g == pytest.approx(n_v, rel=1e-5)
    assert g_g.keys() == g_v.keys()
    for k in g_g:
        assert torch.allclose(g_g[k], g_v[k], rtol=1e-4, atol=1e-6), k
    assert not g_g["blocks.0.attn.qkv.weight"][[0, 3]].any() and g_g["blocks.0.attn.qkv.weight"][1:3].abs().sum() > 0


@pytest.mark.parametrize("pos,n_layers,n_heads,m2,mlp", [("ape", 2, 1, None, "official"), ("rope", 2, 2, None, "swiglu"),
                                                        ("none", 3, 1, None, "official"), ("rope", 2, 1, 24, "official")])
def test_grouped_icl_decoder_equals_each_runs_model_and_its_gradients(pos, n_layers, n_heads, m2, mlp):
    """icl.model.icl_forward over 3 runs (each its own weights, batch and APE offsets) = each run's decoder, its
    output and the gradients of every weight, in float64."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(ICLTransformer(32, 16, pos=pos, n_layers=n_layers, n_heads=n_heads, n_max=16, mlp=mlp,
                                     m2_dim=m2).double())
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]).requires_grad_()
               for k, _ in models[0].named_parameters()}
    batch = {"x": torch.randn(3, 5, 17, 32, dtype=torch.float64), "pos_offset": torch.randint(0, 16, (3, 5)),
             "m2": torch.randn(3, 5, 6, m2, dtype=torch.float64) if m2 else None}
    forward = grouped_forward(models[0])
    out = forward(copy.deepcopy(models[0]).to("meta"), stacked, batch)
    want = torch.stack([m(batch["x"][r], pos_offset=batch["pos_offset"][r], m2=None if m2 is None else batch["m2"][r])
                        for r, m in enumerate(models)])
    assert torch.allclose(out, want.detach(), rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(want)
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    for name, p in stacked.items():
        for r, m in enumerate(models):
            assert torch.allclose(p.grad[r], dict(m.named_parameters())[name].grad, rtol=1e-9, atol=1e-12), name


def _attention_by_autograd(qkv, heads, scale, first_query):
    """The grouped attention's forward, differentiated by autograd: what ``_Attention``'s written-out backward
    must equal."""
    R, B, N, width = qkv.shape
    dim = width // 3
    parts = [t.reshape(R * B, N, dim // heads) for t in qkv.split(dim // heads, dim=-1)]
    outs = []
    for h in range(heads):
        q, k, v = parts[h], parts[heads + h], parts[2 * heads + h]
        q = q[:, :1] if first_query else q
        outs.append(torch.bmm(torch.bmm(q, k.mT).mul(scale).softmax(-1), v))
    return torch.cat(outs, -1).view(R, B, -1, dim)


@pytest.mark.parametrize("first_query", [False, True])
def test_grouped_attention_backward_equals_autograd(first_query):
    """``train.grouped.attention`` (its backward written out) gives autograd's output and qkv gradient: float64 to
    rounding, and bit for bit under the CPU's bf16 autocast with a float32 input (products in bf16, gradient back in
    float32)."""
    from adaptlab.train.grouped import attention

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 4, 9, 3 * 12, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 4, 1 if first_query else 9, 12, generator=g, dtype=torch.float64)
    results = []
    for fn in (attention, _attention_by_autograd):
        x = qkv.clone().requires_grad_()
        out = fn(x, 3, 0.5, first_query)
        out.backward(grad)
        results.append((out.detach(), x.grad))
    (out, dx), (want_out, want_dx) = results
    assert out.shape == want_out.shape and torch.allclose(out, want_out, rtol=1e-12, atol=1e-12)
    assert torch.allclose(dx, want_dx, rtol=1e-10, atol=1e-12)
    if first_query:  # only the first query row feeds the output: the other rows' q gradient is zero
        assert not dx[:, :, 1:, :12].any() and dx[:, :, 0, :12].abs().sum() > 0

    results = []
    for fn in (attention, _attention_by_autograd):
        x = qkv.float().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, 3, 0.5, first_query)
        out.float().backward(grad.float())
        results.append((out.detach(), x.grad))
    (out, dx), (want_out, want_dx) = results
    assert out.dtype == want_out.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert torch.equal(out, want_out) and torch.equal(dx, want_dx)  # the same bf16 products: bit for bit
