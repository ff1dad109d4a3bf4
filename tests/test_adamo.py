"""AdamO (shared/papers/adamo.md §5): λ = 0 is Adam bit for bit, the iso step's action on singular values, the
shape rule, selection by name, per-group settings, state round trips, the fused path, bad input, the stability
warning."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from adaptlab.config import train_config
from adaptlab.models.vit import create_vit
from adaptlab.train.adamo import (AdamO, coupled_isometry_loss, gram_deviation, isometry_grad, isometry_grads,
                                  isometry_param_groups, isometry_penalty, select_isometry)
from adaptlab.train.optim import build_optimizer
from conftest import TINY_MODEL, apply_grads, fixed_grads, small_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lambda_zero_is_adam_bit_for_bit():
    x = torch.randn(64, 8)
    y = torch.randint(4, (64,))
    a, b = small_mlp(), small_mlp()
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
    c, d = small_mlp(), small_mlp()
    bias = lambda m: [p for n, p in m.named_parameters() if n.endswith("bias")]
    oc, od = AdamO(bias(c), lr=1e-2, isometry_lambda=0.1), torch.optim.Adam(bias(d), lr=1e-2, foreach=False)
    grads = fixed_grads(c, 20)
    for o, m in ((oc, c), (od, d)):
        for gs in grads:
            for (n, p), g in zip(m.named_parameters(), gs):
                p.grad = g.clone() if n.endswith("bias") else None
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))


def test_moments_do_not_depend_on_lambda_and_the_step_is_exactly_iso():
    grads = fixed_grads(small_mlp(), 30)
    models, opts = [], []
    for lam in (0.0, 0.1):
        m = small_mlp()
        o = AdamO(m.parameters(), lr=1e-2, isometry_lambda=lam)
        apply_grads(m, o, grads)
        models.append(m), opts.append(o)
    for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opts[0].state[p0][key], opts[1].state[p1][key])
    # one step: the parameters differ by exactly −η·λ·∇R(θ_t)
    m0, m1 = small_mlp(), small_mlp()
    w = m1.layers[0].weight.detach().clone()
    apply_grads(m0, AdamO(m0.parameters(), lr=1e-2, isometry_lambda=0.0), grads[:1])
    apply_grads(m1, AdamO(m1.parameters(), lr=1e-2, isometry_lambda=0.1), grads[:1])
    torch.testing.assert_close(m1.layers[0].weight - m0.layers[0].weight, -1e-2 * 0.1 * isometry_grad(w),
                               rtol=1e-4, atol=1e-7)
    # the coupled variant puts the penalty through the moments, so they differ
    mc = small_mlp()
    oc = torch.optim.Adam(mc.parameters(), lr=1e-2, foreach=False)
    for gs in grads[:3]:
        oc.zero_grad()
        coupled_isometry_loss(mc.named_parameters(), 0.1, exclude=["head*"]).backward()
        for p, g in zip(mc.parameters(), gs):
            p.grad = g.clone() if p.grad is None else p.grad + g
        oc.step()
    m_ref = small_mlp()
    o_ref = AdamO(m_ref.parameters(), lr=1e-2, isometry_lambda=0.1)
    apply_grads(m_ref, o_ref, grads[:3])
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


@pytest.mark.parametrize("shape,split,batch_dims", [((12, 5), 1, 0), ((5, 12), 1, 0), ((3, 24, 8), 3, 1),
                                                    ((2, 6, 2, 3, 3), 1, 1)])
def test_the_penalty_and_its_written_out_gradient_equal_autograd_through_the_gram(shape, split, batch_dims):
    """isometry_penalty's backward is 4·W(G − sI) written out: the same values and gradients as autograd through
    the Gram's definition (float64), also per run under vmap (a fused group's vmap path)."""
    def by_definition(w):
        m = w.reshape(*w.shape[:batch_dims + 1], -1)
        total = 0
        for b in (m.chunk(split, dim=batch_dims) if split > 1 else (m,)):
            gram = b.mT @ b if b.shape[-2] >= b.shape[-1] else b @ b.mT
            total = total + ((gram - 0.7 * torch.eye(gram.shape[-1], dtype=w.dtype)) ** 2).sum((-2, -1))
        return total

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape[:batch_dims], dtype=torch.float64)
    got, want = isometry_penalty(w, 0.7, split, batch_dims), by_definition(w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,), (g_want,) = (torch.autograd.grad(v, w, upstream, retain_graph=True) for v in (got, want))
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    if batch_dims:
        per_run = torch.func.vmap(torch.func.grad(lambda x: isometry_penalty(x, 0.7, split)))(w.detach())
        torch.testing.assert_close(per_run, torch.autograd.grad(want.sum(), w)[0], rtol=1e-12, atol=1e-12)


def test_the_matrices_of_one_shape_go_batched_and_give_each_matrixs_own_penalty_and_step():
    """coupled_isometry_loss and isometry_grads stack the row blocks of one shape (a wide block transposed) into one
    batched Gram: in float64 the sum and every tensor's ∇R equal each matrix on its own by the Gram's definition,
    with a run dimension (a fused group) and without; a half-precision weight's step comes out float32."""
    def own(b):  # the penalty and ∇R of one matrix by definition, its smaller Gram
        b = b.detach().requires_grad_(True)
        gram = b.T @ b if b.shape[0] >= b.shape[1] else b @ b.T
        value = ((gram - 0.7 * torch.eye(gram.shape[0], dtype=b.dtype)) ** 2).sum()
        return value.detach(), torch.autograd.grad(value, b)[0]

    torch.manual_seed(0)
    shapes = {"qkv": (24, 8), "proj": (8, 8), "fc1": (16, 8), "fc2": (8, 16), "conv": (6, 2, 3, 3), "head": (3, 8)}
    chosen = {"qkv": 3, "proj": 1, "fc1": 1, "fc2": 1, "conv": 1, "head": 1}
    for runs in ((), (4,)):
        ws = {n: torch.randn(*runs, *s, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
        grads = dict(zip(ws, isometry_grads(list(ws.values()), 0.7, list(chosen.values()), batch_dims=len(runs))))
        total = coupled_isometry_loss(ws.items(), 1.0, 0.7, exclude=["nothing"], splits={"qkv": 3},
                                      batch_dims=len(runs))
        assert total.shape == runs
        for r in (range(runs[0]) if runs else [None]):
            want = 0.0
            for n, w in ws.items():
                one = (w if r is None else w[r]).detach()
                blocks = one.reshape(one.shape[0], -1).chunk(chosen[n])
                values, steps = zip(*(own(b) for b in blocks))
                want += sum(values)
                got = grads[n] if r is None else grads[n][r]
                torch.testing.assert_close(got, torch.cat(steps).reshape(one.shape), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(total if r is None else total[r], torch.as_tensor(want), rtol=1e-12, atol=1e-12)
    half = isometry_grads([torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16)])
    assert all(g.dtype == torch.float32 for g in half)


def test_the_penalty_stays_in_float32_under_bf16_autocast():
    """A fused group's loss runs under the device's bf16 autocast (train.device.autocast): the penalty's Gram and
    its written-out gradient stay in float32, the same as without autocast."""
    torch.manual_seed(0)
    w = torch.randn(3, 24, 8, requires_grad=True)
    plain = isometry_penalty(w, 1.0, 3, 1)
    (g_plain,) = torch.autograd.grad(plain.sum(), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = isometry_penalty(w, 1.0, 3, 1)
    (g_auto,) = torch.autograd.grad(auto.sum(), w)
    assert auto.dtype == g_auto.dtype == torch.float32
    assert torch.equal(auto, plain) and torch.equal(g_auto, g_plain)


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
    grads = fixed_grads(small_mlp(), 100)

    def adamo(model):
        return AdamO(isometry_param_groups(model.named_parameters(), 0.05, exclude=["head*"]), lr=1e-2, fused=fused)

    a = small_mlp()
    oa = adamo(a)
    apply_grads(a, oa, grads)
    b = small_mlp()
    ob = adamo(b)
    apply_grads(b, ob, grads[:50])
    model_sd, opt_sd = copy.deepcopy(b.state_dict()), copy.deepcopy(ob.state_dict())
    assert opt_sd["param_groups"][0]["isometry_lambda"] == 0.05 and "isometry_lr" in opt_sd["param_groups"][0]
    c = small_mlp(seed=5)
    oc = adamo(c)
    c.load_state_dict(model_sd)
    oc.load_state_dict(copy.deepcopy(opt_sd))  # torch keeps the loop's step tensors, which the steps advance
    apply_grads(c, oc, grads[50:])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    if not fused:  # a checkpoint written before AdamO had the fused key resumes on the loop, bit for bit
        for g in opt_sd["param_groups"]:
            del g["fused"]
        d = small_mlp(seed=6)
        od = adamo(d)
        d.load_state_dict(model_sd)
        od.load_state_dict(opt_sd)
        apply_grads(d, od, grads[50:])
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), d.parameters()))


def test_fused_adamo_steps_like_the_loop():
    """AdamO(fused=True): torch's fused Adam kernel for the Adam part, the same isometry steps; equal to the loop
    at rounding level."""
    grads = fixed_grads(small_mlp(), 60)
    a, b = small_mlp(), small_mlp()
    apply_grads(a, AdamO(isometry_param_groups(a.named_parameters(), 0.1), lr=1e-2), grads)
    apply_grads(b, AdamO(isometry_param_groups(b.named_parameters(), 0.1), lr=1e-2, fused=True), grads)
    start = small_mlp()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        assert (p - p0).abs().max() > 1e-2
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_bad_lambda_and_patterns_are_rejected():
    m = small_mlp()
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
