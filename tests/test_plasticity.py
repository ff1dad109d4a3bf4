"""Study 1 (plasticity): estimator invariants, component probes, bounds, the 7 configurations, tables, presets."""
from __future__ import annotations

import math

import duckdb
import pyarrow as pa
import pytest
import torch
import yaml
from scipy import stats
from timm.models.vision_transformer import VisionTransformer

from adaptlab import records
from adaptlab.aggregate import aggregate
from adaptlab.config import expand_runs, load_config, train_config
from adaptlab.data.store import load_dataset
from adaptlab.models.vit import create_vit, load_model_weights
from adaptlab.plasticity.analysis import analyse, paired_indices
from adaptlab.plasticity.bounds import component_bound, per_head_attention, spectral_norm
from adaptlab.plasticity.components import COMPONENTS, embed, probe
from adaptlab.plasticity.estimator import pair_ratios, plasticity, summarise
from adaptlab.plasticity.run import run_analysis, run_linear_probe
from adaptlab.plasticity.tables import RAW_TABLES, SUMMARY_FIELDS
from adaptlab.runner import summary_row
from adaptlab.studies import expected_run_ids
from adaptlab.train.loop import fit
from adaptlab.train.tasks import ImageClassification
from adaptlab.train.trainable import select_trainable
from conftest import REPO, TINY_MODEL

CPU = torch.device("cpu")
CONFIGS = ("full", "emb", "attn_norm", "mha", "ffn_norm", "ffn_fc1", "ffn_fc2")


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 5, 8, generator=g, dtype=torch.float64), torch.randn(64, 5, 8, generator=g, dtype=torch.float64)


# --- estimator -----------------------------------------------------------------------------------------------


def test_estimator_invariants(pairs):
    x, y = pairs
    assert plasticity(lambda t: t, x, y).mean == pytest.approx(1.0, abs=1e-12)
    assert plasticity(lambda t: -3.0 * t, x, y).mean == pytest.approx(3.0, abs=1e-12)
    assert plasticity(lambda t: torch.ones_like(t), x, y).mean == 0.0
    w = torch.randn(8, 8, dtype=torch.float64)
    lin = plasticity(lambda t: t @ w.T, x, y).mean
    assert plasticity(lambda t: t @ w.T + 5.0, x, y).mean == pytest.approx(lin, rel=1e-12)  # bias cancels
    s = torch.linalg.svdvals(w)
    assert s.min() <= lin <= s.max()
    q, _ = torch.linalg.qr(w)
    assert plasticity(lambda t: t @ q.T, x, y).mean == pytest.approx(1.0, abs=1e-12)  # orthogonal map


def test_mean_of_ratios_not_ratio_of_means():
    # pair 0: distance 1 -> 1 (ratio 1); pair 1: distance 10 -> 100 (ratio 10)
    x = torch.tensor([[0.0], [0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [10.0]], dtype=torch.float64)
    f = lambda t: t ** 2  # noqa: E731
    p = plasticity(f, x, y)
    assert p.mean == pytest.approx(5.5)  # mean of (1, 10); the ratio of means would be 101 / 11
    assert p.n_pairs == 2


def test_zero_distance_pairs_are_excluded_and_counted(pairs):
    x, y = pairs
    y = y.clone()
    y[:3] = x[:3]
    ratios, n_zero = pair_ratios(x * 2, y * 2, x, y)
    assert n_zero == 3 and len(ratios) == 61 and torch.isfinite(ratios).all()
    p = summarise(ratios, n_zero)
    assert p.n_pairs == 61 and p.n_zero == 3
    assert p.ci95 == pytest.approx(0.0, abs=1e-12)  # all ratios equal 2
    assert math.isnan(summarise(torch.empty(0)).mean)


def test_permuting_pairs_does_not_change_plasticity(pairs):
    x, y = pairs
    f = lambda t: torch.tanh(t)  # noqa: E731
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert plasticity(f, x[perm], y[perm]).mean == pytest.approx(plasticity(f, x, y).mean, rel=1e-12)


# --- component probes and bounds -------------------------------------------------------------------------------


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, mlp_ratio=4.0,
                              num_classes=0).double().eval()
    for p in model.parameters():  # move LN gains/biases away from (1, 0) so the probes are not trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def test_layernorm_probe_is_zero_on_rescaled_pairs(vit):
    x = torch.randn(16, 17, 32, dtype=torch.float64)
    for comp in ("attn_norm", "ffn_norm"):
        p = plasticity(lambda t: probe(vit.blocks[1], comp, t), x, 2.0 * x)
        assert p.mean < 1e-4, comp


def test_fc2_probe_is_the_zero_padded_forward(vit):
    x = torch.randn(4, 17, 32, dtype=torch.float64)
    fc2 = vit.blocks[0].mlp.fc2
    padded = torch.cat([x, torch.zeros(4, 17, 96, dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(probe(vit.blocks[0], "ffn_fc2", x), fc2(padded), rtol=0, atol=1e-12)
    torch.testing.assert_close(probe(vit.blocks[0], "ffn_fc2", x, "fc1_output"),
                               fc2(vit.blocks[0].mlp.act(vit.blocks[0].mlp.fc1(x))))
    with pytest.raises(ValueError, match="fc2_input"):
        probe(vit.blocks[0], "ffn_fc2", x, "bogus")


def test_per_head_slicing_reproduces_the_fused_attention(vit):
    x = torch.randn(3, 17, 32, dtype=torch.float64)
    for block in vit.blocks:
        torch.testing.assert_close(per_head_attention(block.attn, x), block.attn(x), rtol=1e-9, atol=1e-10)


def test_bounds_hold_on_measured_plasticity(vit):
    images = torch.randn(48, 3, 16, 16, dtype=torch.float64)
    rows, stats_ = analyse(vit, images[:24], images[24:], radius="max")
    assert len(rows) == 3 * len(COMPONENTS) and stats_["n_tokens"] == 17
    for r in rows:
        assert r["n_pairs"] == 24 and r["n_zero"] == 0
        if r["component"] in ("mha", "ffn_fc1", "ffn_fc2"):  # true bounds; the LayerNorm one is the paper's heuristic
            assert r["plasticity"] <= r["bound"] * (1 + 1e-9), r
    for block in vit.blocks:  # FC2's padded probe only uses W2[:, :d], whose norm is below sigma_max(W2)
        assert spectral_norm(block.mlp.fc2.weight[:, :32]) <= component_bound(block, "ffn_fc2", 17, 1.0) + 1e-12


def test_every_layer_is_probed_on_the_same_embedding_output(vit):
    images = torch.randn(16, 3, 16, 16, dtype=torch.float64)
    before, _ = analyse(vit, images[:8], images[8:])
    with torch.no_grad():
        vit.blocks[0].mlp.fc2.weight.mul_(10.0)  # changes block 0's output, hence block 1's real input
    after, _ = analyse(vit, images[:8], images[8:])
    for b, a in zip(before, after):
        if b["layer"] == 1:
            assert a["plasticity"] == pytest.approx(b["plasticity"], rel=1e-12)
    x = embed(vit, images[:2])
    assert x.shape == (2, 17, 32)


def test_paired_indices_cycle_the_shorter_test_set():
    src, tgt = paired_indices(5, 3, 7)
    assert src.tolist() == [0, 1, 2, 3, 4, 0, 1] and tgt.tolist() == [0, 1, 2, 0, 1, 2, 0]


# --- the seven configurations ---------------------------------------------------------------------------------


def _expected_trainable(model, config: str) -> set[str]:
    """Built from the module structure, independently of the config's fnmatch patterns."""
    names = {n for n, _ in model.named_parameters()}
    head = {n for n in names if n.startswith("head.") or n.startswith("norm.")}
    if config == "full":
        return names
    parts = {"emb": lambda n: n.startswith("patch_embed.") or n in ("cls_token", "pos_embed"),
             "attn_norm": lambda n: ".norm1." in n, "mha": lambda n: ".attn." in n, "ffn_norm": lambda n: ".norm2." in n,
             "ffn_fc1": lambda n: ".mlp.fc1." in n, "ffn_fc2": lambda n: ".mlp.fc2." in n}
    return head | {n for n in names if parts[config](n)}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_configuration_trains_exactly_its_component(tiny_data, tiny_pretrained, tmp_path, optimizer):
    sets = load_config(REPO / "config.yaml")["trainable_sets"]
    data = load_dataset(tiny_data)
    for config in CONFIGS:
        torch.manual_seed(0)
        model = create_vit(TINY_MODEL, data.num_classes)
        load_model_weights(model, tiny_pretrained, skip_head=True)
        names = set(select_trainable(model, sets[config]))
        assert names == _expected_trainable(model, config), config
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = train_config({"steps": 6, "batch_size": 16, "eval_every": 3, "optimizer": optimizer, "lr": 0.05,
                            "weight_decay": 0.1})
        fit(model, ImageClassification(data, 16, CPU, seed=0), cfg, tmp_path / f"{optimizer}-{config}", device=CPU,
            config_id=config)
        after = dict(model.named_parameters())
        for name, p in after.items():
            if name in names:
                assert not torch.equal(p.detach(), before[name]), f"{config}: trainable {name} did not move"
            else:
                assert torch.equal(p.detach(), before[name]), f"{config}: frozen {name} moved under {optimizer}"
                assert p.grad is None


# --- runs, tables and presets ---------------------------------------------------------------------------------


def test_analysis_and_linear_probe_runs_write_records(tiny_data, tiny_pretrained, tmp_path):
    spec = {"backbone": "base", "dataset": "tiny", "source": "tiny", "model": TINY_MODEL, "n_pairs": 20,
            "fc2_input": "padded", "radius": "max", "batch_size": 8, "linear_probe": {"max_iter": 200, "C": 1.0}}
    row = run_analysis(spec, tiny_pretrained, tiny_data, tiny_data, tmp_path / "a", device="cpu")
    assert row["status"] == "ok" and row["n_pairs"] == 20 and row["radius"] > 0
    layers = duckdb.sql(f"SELECT * FROM '{tmp_path / 'a' / 'plasticity_probe.parquet'}'").fetchall()
    assert len(layers) == 2 * len(COMPONENTS)
    # identical images on both sides: every pair has zero distance and is excluded, not divided by zero
    assert {r[8] for r in layers} == {0} and {r[9] for r in layers} == {20}
    lp = run_linear_probe(spec, tiny_pretrained, tiny_data, tmp_path / "lp", device="cpu")
    assert lp["status"] == "ok" and 0.0 <= lp["test_acc"] <= 1.0 and lp["kind"] == "linear_probe"
    assert records.read_summary(tmp_path / "lp" / "summary.parquet")["test_acc"] == lp["test_acc"]


def _row(run_id, kind, dataset, trainable=None, lr=None, seed=0, val=None, test=None, optimizer="sgd"):
    identity = {"run_id": run_id, "kind": kind, "study": "plasticity", "grid": "components" if kind == "finetune" else None,
                "backbone": "base", "dataset": dataset, "seed": seed, "lr": lr, "optimizer": optimizer,
                "trainable": trainable}
    row = summary_row(identity, {"steps": 1}, None, None, CPU, {}, 0.0, status="ok")
    row.update(best_val_acc=val, test_acc=test, **{f.name: None for f in SUMMARY_FIELDS})
    return row


def test_relative_gain_spearman_and_significance_tables(tmp_path):
    """A hand-made grid: 3 datasets x 3 configs x 2 lrs; every number below is computed by hand / by scipy."""
    results = tmp_path / "results"
    lp = {"d1": 0.5, "d2": 0.4, "d3": 0.8}
    # (val, test) per (dataset, config, lr): the val-best lr is NOT the test-best one for mha on d1
    acc = {("d1", "mha", 0.1): (0.9, 0.60), ("d1", "mha", 0.01): (0.8, 0.70),
           ("d1", "attn_norm", 0.1): (0.5, 0.55), ("d1", "attn_norm", 0.01): (0.6, 0.50),
           ("d1", "ffn_fc1", 0.1): (0.7, 0.65), ("d1", "ffn_fc1", 0.01): (0.6, 0.62),
           ("d2", "mha", 0.1): (0.7, 0.52), ("d2", "mha", 0.01): (0.6, 0.50),
           ("d2", "attn_norm", 0.1): (0.4, 0.42), ("d2", "attn_norm", 0.01): (0.5, 0.44),
           ("d2", "ffn_fc1", 0.1): (0.6, 0.48), ("d2", "ffn_fc1", 0.01): (0.5, 0.47),
           ("d3", "mha", 0.1): (0.9, 0.88), ("d3", "mha", 0.01): (0.8, 0.85),
           ("d3", "attn_norm", 0.1): (0.8, 0.79), ("d3", "attn_norm", 0.01): (0.7, 0.81),
           ("d3", "ffn_fc1", 0.1): (0.85, 0.86), ("d3", "ffn_fc1", 0.01): (0.8, 0.84)}
    ids = []
    for (ds, comp, lr), (val, test) in acc.items():
        rid = f"components/{ds}/{comp}/sgd/lr{lr}/seed0"
        records.write_summary(results / "runs" / rid / "summary.parquet",
                              _row(rid, "finetune", ds, comp, lr, val=val, test=test), extra_fields=SUMMARY_FIELDS)
        ids.append(rid)
    for ds, a in lp.items():
        rid = f"plasticity/linear_probe/base/{ds}"
        records.write_summary(results / "runs" / rid / "summary.parquet", _row(rid, "linear_probe", ds, test=a),
                              extra_fields=SUMMARY_FIELDS)
        ids.append(rid)
    plast = {"mha": 3.0, "ffn_fc1": 2.0, "attn_norm": 0.5}
    for ds in lp:
        rid = f"plasticity/analysis/base/{ds}"
        records.write_summary(results / "runs" / rid / "summary.parquet", _row(rid, "plasticity_analysis", ds),
                              extra_fields=SUMMARY_FIELDS)
        probe_rows = [{"run_id": rid, "backbone": "base", "dataset": ds, "layer": l, "component": c,
                       "theoretical_rank": {"mha": 1, "ffn_fc1": 2, "attn_norm": 5}[c], "plasticity": v + l,
                       "ci95": 0.1, "n_pairs": 10, "n_zero": 0, "bound": 100.0}
                      for l in (0, 1) for c, v in plast.items()]
        records.write_table(pa.Table.from_pylist(probe_rows, schema=RAW_TABLES["plasticity_probe"]),
                            results / "runs" / rid / "plasticity_probe.parquet")
        ids.append(rid)
    assert aggregate(results, ids) == []
    con = duckdb.connect(str(results / "adaptlab.duckdb"), read_only=True)
    ft = {(d, c): (lr, t, rg) for d, c, lr, t, rg in con.execute(
        "SELECT dataset, config, best_lr, test_acc_mean, rg FROM plasticity_finetune").fetchall()}
    assert ft[("d1", "mha")][:2] == (0.1, 0.60)  # chosen on val (0.9), not on test (0.70)
    for (d, c), (lr, t, rg) in ft.items():
        assert rg == pytest.approx((t - lp[d]) / lp[d] * 100)
    comps = {c: (p, rg, gap, n) for c, p, rg, gap, n in con.execute(
        "SELECT config, mean_plasticity, mean_rg, lr_sensitivity, n_runs FROM plasticity_components").fetchall()}
    mean_rg = {c: sum(ft[(d, c)][2] for d in lp) / 3 for c in plast}
    for c in plast:
        assert comps[c][0] == pytest.approx(plast[c] + 0.5)  # mean over layers 0, 1 and datasets
        assert comps[c][1] == pytest.approx(mean_rg[c])
        gaps = [abs(acc[(d, c, 0.1)][1] - acc[(d, c, 0.01)][1]) for d in lp]
        assert comps[c][2] == pytest.approx(sum(gaps) / 3)
        assert comps[c][3] == 6
    rho = con.execute("SELECT DISTINCT spearman_plasticity_rg FROM plasticity_components").fetchall()
    expected_rho = stats.spearmanr([plast[c] for c in plast], [mean_rg[c] for c in plast]).statistic
    assert len(rho) == 1 and rho[0][0] == pytest.approx(expected_rho)
    sig = {v: (n, t, tp, wp) for v, n, t, tp, wp in con.execute(
        "SELECT versus, n_datasets, t_stat, t_pvalue, wilcoxon_pvalue_greater FROM plasticity_significance").fetchall()}
    assert set(sig) == {"attn_norm", "ffn_fc1"}
    for other in sig:
        a = [ft[(d, "mha")][1] for d in sorted(lp)]
        b = [ft[(d, other)][1] for d in sorted(lp)]
        ref = stats.ttest_rel(a, b)
        assert sig[other][:3] == (3, pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
        assert sig[other][3] == pytest.approx(stats.wilcoxon(a, b, alternative="greater").pvalue)
    con.close()


def test_paper_preset_enumerates_the_papers_grid():
    cfg = load_config(REPO / "configs/paper.yaml")
    runs = [r for r in expand_runs(cfg) if r.study == "plasticity"]
    main = [r for r in runs if r.optimizer == "sgd" and r.backbone == "base"]
    adamw = [r for r in runs if r.optimizer == "adamw"]
    size = [r for r in runs if r.backbone != "base"]
    assert (len(main), len(adamw), len(size)) == (924, 288, 144)
    assert len({r.run_id for r in runs}) == 1356
    assert len({r.dataset for r in main}) == 11 and {r.seed for r in runs} == {0, 42, 3407}
    assert {r.trainable for r in main} == set(CONFIGS) and "emb" not in {r.trainable for r in adamw + size}
    assert {r.backbone for r in size} == {"large", "huge"}
    ids = expected_run_ids(cfg)
    assert sum(i.startswith("plasticity/analysis/") for i in ids) == 13  # 11 datasets on base + clipart on large, huge


def test_cpu_preset_has_the_full_structure():
    runs = [r for r in expand_runs(load_config(REPO / "configs/cpu.yaml")) if r.study == "plasticity"]
    main = [r for r in runs if r.optimizer == "sgd" and r.backbone == "base"]
    assert len({r.dataset for r in main}) >= 4 and len({r.seed for r in main}) == 3 and len({r.lr for r in main}) == 4
    assert {r.trainable for r in main} == set(CONFIGS)
    assert len(runs) >= 480 and any(r.optimizer == "adamw" for r in runs)


def test_unknown_source_dataset_is_rejected():
    from adaptlab.config import ConfigError, validate_config

    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["plasticity"]["source"] = "imagenet"
    with pytest.raises(ConfigError, match="plasticity.source: unknown dataset 'imagenet'"):
        expected_run_ids(validate_config(raw))
    raw["plasticity"]["fc2_input"] = "nope"
    with pytest.raises(ConfigError, match="plasticity.fc2_input"):
        validate_config(raw)
