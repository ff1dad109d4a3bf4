"""Study 4 (icl): generator statistics, RoPE, a hand-built induction circuit, determinism, the multimodal
diagnostic, bad parameters, the metrics on hand-set attention, and a tiny end-to-end pipeline."""
from __future__ import annotations

import math
import subprocess
import sys

import duckdb
import numpy as np
import pytest
import torch
import yaml

from adaptlab.config import ConfigError, validate_config
from adaptlab.icl.data import ICLWorld, MultimodalWorld, check_params, rng_for
from adaptlab.icl.metrics import attention_measures, context_label_agreement
from adaptlab.icl.model import ICLTransformer, apply_rope, rope_angles
from adaptlab.icl import specs
from adaptlab.icl.run import build_model
from adaptlab.icl.task import ICLTask
from conftest import copy_workflow


def sigma3(p, n):
    return 3 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------------------------------
# generator


def test_bursty_and_novel_fractions_and_burst_structure():
    w = ICLWorld(K=2 ** 16, D=16, L=32, N=8, B=2, p_bursty=0.6, p_novel=0.0, seed=0)
    b = w.sample(rng_for(0, 9), 10_000)
    assert abs(b.bursty.mean() - 0.6) < sigma3(0.6, 10_000)
    distinct_ok = 0
    for ctx, q in zip(b.ctx_classes[b.bursty], b.query_class[b.bursty]):
        vals, counts = np.unique(ctx, return_counts=True)
        if len(vals) == 4:  # N/B distinct classes (a repeat draw is rare at K = 2^16)
            distinct_ok += 1
            assert (counts == 2).all()
        assert (ctx == q).sum() >= 2  # the query class sits in the context at least B times
    assert distinct_ok >= 0.99 * b.bursty.sum()
    w = ICLWorld(K=256, D=16, L=32, N=8, B=4, p_bursty=1.0, p_novel=0.3, seed=0)
    b = w.sample(rng_for(0, 10), 10_000)
    assert abs(b.novel.mean() - 0.3) < sigma3(0.3, 10_000)
    assert (b.query_class[b.novel] >= 10 ** 6).all() and (b.query_class[~b.novel] < 256).all()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_zipf_class_law(alpha):
    K = 64
    w = ICLWorld(K=K, D=8, L=32, N=8, B=2, alpha=alpha, seed=1)
    ctx, query, *_ = w.sample_classes(rng_for(1, 2), 125_000, p_bursty=0.0, p_novel=0.0)
    counts = np.bincount(ctx.ravel(), minlength=K)  # 10^6 draws
    slope = np.polyfit(np.log(np.arange(1, K + 1)), np.log(counts), 1)[0]
    assert abs(slope + alpha) < 0.02
    if alpha == 0:
        chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
        assert chi2 < K - 1 + 4 * math.sqrt(2 * (K - 1))  # far inside the χ²(63) tail


def test_novel_class_queries_have_uniform_labels_at_alpha_1():
    """Novel classes are drawn uniformly (the reference generator), not from the training classes' Zipf law: at
    alpha = 1 a Zipf draw would give label 0 with probability ≈ 0.19 instead of 1/L."""
    w = ICLWorld(K=256, D=8, L=32, N=8, B=2, alpha=1.0, seed=0)
    b = w.sample(rng_for(0, 9), 40_000, p_bursty=1.0, p_novel=1.0)
    counts = np.bincount(b.target, minlength=32)
    assert abs(counts[0] / counts.sum() - 1 / 32) < sigma3(1 / 32, counts.sum())
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 31 + 4 * math.sqrt(2 * 31)
    # the training classes keep their Zipf law: label 0 far above 1/L
    t = w.sample(rng_for(0, 10), 40_000, p_bursty=1.0, p_novel=0.0)
    assert (t.target == 0).mean() > 3 / 32
    # the multimodal generator's novel pairs: uniform over the secondary labels too
    mm = MultimodalWorld(ICLWorld(K=512, D=8, L=32, N=8, B=2, alpha=1.0, seed=0, n_max=16), K2=64, D2=8, L2=16,
                         alpha2=1.0, seed=0)
    m = mm.sample(rng_for(0, 11), 40_000, novel=True)
    counts2 = np.bincount(m.target, minlength=16)
    chi2 = ((counts2 - counts2.mean()) ** 2 / counts2.mean()).sum()
    assert chi2 < 15 + 4 * math.sqrt(2 * 15)


def test_labels_tokens_norms_and_positions():
    w = ICLWorld(K=128, D=32, L=32, N=8, B=2, p_bursty=0.5, seed=3, n_max=16)
    b = w.sample(rng_for(3, 0), 4000)
    assert (b.ctx_labels == b.ctx_classes % 32).all() and (b.target == b.query_class % 32).all()
    assert np.array_equal(b.tokens[:, 1::2], w.label_vecs[b.ctx_labels])  # label tokens are λ exactly
    items = np.concatenate([b.tokens[:, 0:-1:2], b.tokens[:, -1:]], 1)
    assert abs((items ** 2).sum(-1).mean() - 1) < 0.01
    assert b.pos_offset.min() == 0 and b.pos_offset.max() == 33 - 17
    m = ICLTransformer(32, 32, pos="ape", n_max=16)
    assert m.width == 32 + 33
    x = torch.from_numpy(b.tokens[:4])
    off = torch.from_numpy(b.pos_offset[:4])
    hot = torch.nn.functional.one_hot(off[:, None] + torch.arange(17), 33)
    assert (hot.sum(-1) == 1).all() and (hot.argmax(-1).diff(dim=1) == 1).all()
    assert m(x, pos_offset=off).shape == (4, 32)


def test_eval_set_semantics():
    w = ICLWorld(K=1024, D=32, L=32, N=8, B=2, seed=0)
    sets = w.eval_sets(2, 500)
    ic, ic2, iw = sets["ic"], sets["ic2"], sets["iw"]
    assert ic.novel.all() and not ic2.novel.any() and not iw.bursty.any()
    # IC items are far from every training mean; a training item is close to its own mean
    def max_cos(x):
        mu = w.means / np.linalg.norm(w.means, axis=1, keepdims=True)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True) @ mu.T).max(-1).mean()
    assert max_cos(ic.tokens[:, -1]) < 0.75 and max_cos(iw.tokens[:, -1]) > 0.95
    assert (ic2.ctx_labels == (ic2.ctx_classes + 1) % 32).all() and (ic2.target == (ic2.query_class + 1) % 32).all()


def test_bad_parameters_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="must divide the number of context pairs N=8"):
        ICLWorld(K=64, L=32, N=8, B=3)
    with pytest.raises(ValueError, match="K=100 must be a positive multiple of L=32"):
        ICLWorld(K=100, L=32, N=8, B=2)
    with pytest.raises(ValueError, match="B=8 must divide"):
        check_params(64, 32, 8, 8)
    base = _minimal_config(steps=10)
    bad = {**base, "icl": {**base["icl"], "unimodal": {"Ks": [64, 100]}}}
    with pytest.raises(ConfigError, match=r"icl\.unimodal\.Ks\[1\]: .*K=100 must be a positive multiple of L=16"):
        specs(validate_config(bad))
    bad = {**base, "icl": {**base["icl"], "data": {**base["icl"]["data"], "B": 3}}}
    with pytest.raises(ConfigError, match=r"icl\..*B=3 must divide"):
        specs(validate_config(bad))
    bad = {**base, "icl": {**base["icl"], "multimodal": {"Ks": [24]}}}
    with pytest.raises(ConfigError, match=r"icl\.multimodal\.Ks\[0\]"):
        specs(validate_config(bad))


# ---------------------------------------------------------------------------------------------------------
# model


def test_rope_is_a_rotation_and_relative():
    torch.manual_seed(0)
    d = 64
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    ang = rope_angles(16, d).double()
    rot = lambda x, p: apply_rope(x, torch.polar(torch.ones_like(ang[p]), ang[p]))  # noqa: E731
    for p in range(16):
        assert abs(rot(q, p).norm() / q.norm() - 1) < 1e-6
    assert torch.allclose(rot(q, 0), q)
    dot = lambda m, n: rot(q, m) @ rot(k, n)  # noqa: E731
    assert abs(dot(2, 5) - dot(7, 10)) < 1e-5 and abs(dot(0, 3) - dot(12, 15)) < 1e-5
    assert abs(dot(2, 5) - dot(2, 6)) > 1e-3  # it does depend on the offset
    # the rotation matrix is block-diagonal in 2×2 pairs
    R = torch.stack([rot(e, 3) for e in torch.eye(d, dtype=torch.float64)], 1)
    assert torch.allclose(R.T @ R, torch.eye(d, dtype=torch.float64), atol=1e-6)
    mask = torch.block_diag(*[torch.ones(2, 2)] * (d // 2)).bool()
    assert (R[~mask].abs() < 1e-12).all()


def test_model_causal_init_loss_and_widths():
    torch.manual_seed(0)
    w = ICLWorld(K=256, D=32, L=32, N=8, B=2, seed=0, n_max=16)
    for pos, width in (("ape", 65), ("rope", 32), ("none", 32)):
        m = ICLTransformer(32, 32, pos=pos, n_max=16)
        assert m.width == width
        task = ICLTask(w, torch.device("cpu"), 0, eval_size=16)
        batch = task.train_batch(0, 256)
        assert abs(task.loss(m, batch).item() - math.log(32)) < 0.1
        m.set_record_attn(True)
        task.forward(m, batch)
        for A in m.attention_maps():
            assert torch.all(A.triu(1) == 0) and torch.allclose(A.sum(-1), torch.ones(()))


@pytest.mark.parametrize("pos,n_layers,n_heads,m2", [("ape", 2, 1, None), ("rope", 2, 2, None), ("none", 3, 1, None),
                                                    ("rope", 2, 1, 24)])
def test_last_block_trimmed_to_the_query_row_gives_the_full_forward_and_gradients(pos, n_layers, n_heads, m2):
    """Training runs the last block for the last position only; recording attention runs every row of it."""
    torch.manual_seed(0)
    m = ICLTransformer(32, 32, pos=pos, n_layers=n_layers, n_heads=n_heads, n_max=16, m2_dim=m2).double()
    x = torch.randn(6, 17, 32, dtype=torch.float64)
    kw = {"pos_offset": torch.arange(6) % 3, "m2": torch.randn(6, 6, m2, dtype=torch.float64) if m2 else None}
    outs, grads = {}, {}
    for full in (False, True):
        m.zero_grad()
        m.set_record_attn(full)
        outs[full] = m(x, **kw)
        outs[full].square().sum().backward()
        grads[full] = [p.grad.clone() for p in m.parameters()]
    assert m.attention_maps()[-1].shape[-2:] == (17, 17)  # the full path did run every row
    assert torch.allclose(outs[False], outs[True], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    m.set_record_attn(False)
    h = torch.randn(6, 17, m.width, dtype=torch.float64)
    assert m.blocks[-1](h, last_query=True).shape == (6, 1, m.width)
    assert torch.allclose(m.blocks[-1](h, last_query=True)[:, 0], m.blocks[-1](h)[:, -1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# metrics and the reference induction circuit


def test_metrics_on_hand_set_attention():
    n, N = 5, 8
    T = 2 * N + 1
    ctx = np.tile(np.arange(N) % 4, (n, 1))
    target = np.zeros(n, dtype=int)
    prev = torch.zeros(n, T, T)
    prev[:, 0, 0] = 1
    prev[:, torch.arange(1, T), torch.arange(T - 1)] = 1
    assert attention_measures(prev, ctx, target, False)["ph"] == pytest.approx(1.0)
    uni = torch.ones(n, T, T).tril()
    uni = uni / uni.sum(-1, keepdim=True)
    m = attention_measures(uni, ctx, target, False)
    assert m["ih"] == pytest.approx(0.0, abs=1e-7) and m["tla"] == pytest.approx(N / T)
    assert context_label_agreement(np.array([0, 9]), np.array([[0, 1], [1, 2]])) == 0.5


def induction_circuit(b, world, beta=50.0):
    """No training: attend from x_q to each label slot with logit β·x_q·x_i (x_i the item before it), copy λ."""
    items, q = b.tokens[:, 0:-1:2], b.tokens[:, -1]
    logits = beta * np.einsum("nd,nid->ni", q, items)
    att = np.exp(logits - logits.max(1, keepdims=True))
    att /= att.sum(1, keepdims=True)
    out = np.einsum("ni,nid->nd", att, b.tokens[:, 1::2])
    pred = (out @ world.label_vecs.T).argmax(1)
    A = np.zeros((len(b), b.tokens.shape[1], b.tokens.shape[1]))
    A[:, -1, 1::2] = att
    return pred, torch.from_numpy(A)


def test_hand_built_induction_circuit_solves_icl():
    w = ICLWorld(K=1024, D=32, L=32, N=8, B=2, seed=0)
    sets = w.eval_sets(3, 1000)
    acc = {}
    for name in ("ic", "ic2", "iw"):
        pred, A = induction_circuit(sets[name], w)
        acc[name] = (pred == sets[name].target).mean()
    assert acc["ic"] > 0.99 and acc["ic2"] > 0.99 and acc["iw"] < 0.12
    pred, A = induction_circuit(sets["ic"], w)
    assert context_label_agreement(pred, sets["ic"].ctx_labels) == 1.0
    assert attention_measures(A, sets["ic"].ctx_labels, sets["ic"].target, False)["ih"] == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------------------------------------
# determinism and the multimodal diagnostic


def test_identical_seeds_give_identical_batches_sets_and_weights():
    def make(seed):
        w = ICLWorld(K=512, D=16, L=32, N=8, B=2, p_bursty=0.7, p_novel=0.2, seed=seed)
        return w, ICLTask(w, torch.device("cpu"), seed, eval_size=64)

    (_, t1), (_, t2), (_, t3) = make(4), make(4), make(5)
    for step in (0, 7):
        b1, b2, b3 = t1.train_batch(step, 32), t2.train_batch(step, 32), t3.train_batch(step, 32)
        assert all(torch.equal(b1[k], b2[k]) for k in b1) and not torch.equal(b1["x"], b3["x"])
    assert not torch.equal(t1.train_batch(0, 32)["x"], t1.train_batch(1, 32)["x"])
    assert np.array_equal(t1._sets["test"]["ic"].tokens, t2._sets["test"]["ic"].tokens)
    spec = {"kind": "icl_uni", "scheme": "rope", "data": {"D": 16, "L": 32, "n_max": 16},
            "model": {"n_layers": 2, "n_heads": 1, "mlp": "official", "rope_base": 1e4}}
    torch.manual_seed(4)
    a = build_model(spec).state_dict()
    torch.manual_seed(4)
    b = build_model(spec).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_multimodal_pairs_and_m2only_diagnostic():
    m1 = ICLWorld(K=512, D=16, L=32, N=8, B=2, seed=0, n_max=16)
    mm = MultimodalWorld(m1, K2=64, D2=24, L2=16, seed=0)
    b = mm.sample(rng_for(0, 5), 2000)
    assert b.tokens.shape == (2000, 26, 16) and b.m2.shape == (2000, 9, 24)
    assert (b.ctx_classes % 32 == b.ctx_classes2 % 16).all() and (b.ctx_labels == b.ctx_classes2 % 16).all()
    assert (b.ctx_labels < 16).all() and (b.target == b.query_class2 % 16).all()
    assert np.array_equal(b.tokens[:, 2:24:3], m1.label_vecs[b.ctx_labels])
    pair_in_ctx = ((b.ctx_classes == b.query_class[:, None]) & (b.ctx_classes2 == b.query_class2[:, None])).any(1)
    assert pair_in_ctx.all()
    # the diagnostic: the same draw with the query's primary class swapped for another class of the same label
    for novel in (False, True):
        a = mm.sample(rng_for(0, 6), 2000, novel=novel)
        d = mm.sample(rng_for(0, 6), 2000, novel=novel, m2only=True)
        assert np.array_equal(a.ctx_classes, d.ctx_classes) and np.array_equal(a.query_class2, d.query_class2)
        assert (a.query_class != d.query_class).all()
        assert (a.query_class % 32 == d.query_class % 32).all() and np.array_equal(a.target, d.target)
    sets = mm.eval_sets(2, 100)
    assert set(sets) == {"ic", "ic2", "iw", "train", "ic_m2only"}
    model = ICLTransformer(16, 32, pos="ape", n_max=16, m2_dim=24)
    task = ICLTask(mm, torch.device("cpu"), 0, eval_size=100)
    out = task.evaluate(model, "val")
    assert {"m2only_acc", "ph2_l1", "tiia_m2_l2", "ih_l2"} <= set(out)


# ---------------------------------------------------------------------------------------------------------
# end to end


def _minimal_config(steps=30):
    return {
        "device": "cpu",
        "threads": {"pretrain": 1, "finetune": 1},
        "datasets": {"source": {"kind": "procedural", "classes": 4, "image_size": 16, "n_train": 64, "n_val": 32,
                                "n_test": 32, "seed": 0}},
        "model": {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 1, "mlp_ratio": 1.0},
        "pretrain": {"dataset": "source", "train": {"steps": 2, "batch_size": 16, "eval_every": 2}},
        "trainable_sets": {"head": []},
        "finetune": {"defaults": {"steps": 2, "batch_size": 16, "eval_every": 2},
                     "grids": {"g": {"datasets": ["source"], "seeds": [0], "lrs": [0.01], "trainable": ["head"]}}},
        "icl": {"data": {"D": 16, "L": 16, "N": 4, "B": 2, "n_max": 8, "eval_size": 64},
                "train": {"steps": steps, "eval_every": 10, "batch_size": 32},
                "unimodal": {"schemes": ["ape"], "Ks": [32], "seeds": [0]},
                "multimodal": {"stage1": {"scheme": "ape", "K": 32}, "Ks": [16], "D2": 8, "L2": 8,
                               "train": {"steps": 10, "eval_every": 5}}},
    }


def test_pipeline_end_to_end(tmp_path):
    cfg = _minimal_config()
    ids = specs(validate_config(cfg))
    assert sorted(ids) == sorted(["icl/uni/ape/K32/seed0", "icl/mm/pretrained/K16/seed0", "icl/mm/scratch/K16/seed0"])
    sp = specs(validate_config(cfg))
    # the pretrained arm depends on the unimodal run of the same seed; a stage-1 K outside the grid adds that run
    assert sp["icl/mm/pretrained/K16/seed0"]["stage1"] == "icl/uni/ape/K32/seed0"
    other = validate_config({**cfg, "icl": {**cfg["icl"], "multimodal": {**cfg["icl"]["multimodal"],
                                                                         "stage1": {"scheme": "rope", "K": 64}}}})
    assert "icl/uni/rope/K64/seed0" in specs(other)
    wd = copy_workflow(tmp_path / "wf")
    (wd / "configs/icl_tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "configs/icl_tiny.yaml"],
                          cwd=wd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with duckdb.connect(str(wd / "results/adaptlab.duckdb"), read_only=True) as con:
        status = dict(con.execute("SELECT run_id, status FROM runs WHERE study = 'icl'").fetchall())
        assert status == {i: "ok" for i in ids}
        thr = con.execute("SELECT scheme, K, n_seeds, ic_acc, iw_acc FROM icl_threshold ORDER BY ALL").fetchall()
        assert [(s, k, n) for s, k, n, *_ in thr] == [("ape", 32, 1)]
        assert all(0 <= r[3] <= 1 and 0 <= r[4] <= 1 for r in thr)
        mm = con.execute("SELECT arm, K2, m2only_acc, ic_acc_step0 FROM icl_multimodal ORDER BY arm").fetchall()
        assert [(a, k) for a, k, *_ in mm] == [("pretrained", 16), ("scratch", 16)]
        assert all(r[2] is not None and r[3] is not None for r in mm)
        # both arms draw the same initial weights from the seed, so only the loaded stage-1 decoder separates them
        loss0 = dict(con.execute("SELECT run_id, value FROM icl_eval WHERE step = 0 AND metric = 'loss' "
                                 "AND run_id LIKE 'icl/mm/%'").fetchall())
        assert loss0["icl/mm/pretrained/K16/seed0"] != loss0["icl/mm/scratch/K16/seed0"]
        # per eval step (0, 10, 20, 30) × 2 layers for a unimodal run
        n = con.execute("SELECT count(*), count(DISTINCT step), count(DISTINCT layer) FROM icl_training "
                        "WHERE run_id = 'icl/uni/ape/K32/seed0'").fetchone()
        assert n == (8, 4, 2)
    for name in ("icl_vs_k", "icl_induction", "icl_multimodal"):
        assert (wd / f"results/figures/{name}.png").read_bytes()[:4] == b"\x89PNG"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile",
                           "configs/icl_tiny.yaml"], cwd=wd, capture_output=True, text=True)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    # a stage-2 value reruns the multimodal runs only, never their stage-1 run
    cfg["icl"]["multimodal"]["train"]["steps"] = 12
    (wd / "configs/icl_tiny2.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile",
                           "configs/icl_tiny2.yaml"], cwd=wd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "rule icl_mm" in out and "rule icl_uni" not in out


def test_a_failing_run_is_recorded_not_raised(tmp_path):
    from adaptlab import records
    from adaptlab.icl.run import run_icl

    spec = specs(validate_config(_minimal_config()))["icl/uni/ape/K32/seed0"]
    spec = {**spec, "K": 30}  # not a multiple of L: the generator refuses it inside the run
    row = run_icl(spec, tmp_path, device="cpu")
    assert row["status"] == "failed" and "K=30 must be a positive multiple of L=16" in row["error"]
    assert records.read_summary(tmp_path / "summary.parquet")["status"] == "failed"
    assert (tmp_path / "icl_eval.parquet").exists() and (tmp_path / "steps.parquet").exists()
