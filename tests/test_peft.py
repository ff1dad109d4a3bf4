"""Study 3 (peft): LoRA / adapter invariants, deformable attention, mask AP, the COCO loader, the DAG end to end."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import duckdb
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from adaptlab.models.vit import create_vit, load_model_weights
from adaptlab.peft.adapters import AdapterConfig, adapter_params, attention_modules, inject_adapters
from adaptlab.peft.deformable import MSDeformAttn, ms_deform_attn_core
from adaptlab.peft.dense_head import InstanceSegmenter
from adaptlab.peft.head_config import DenseHeadConfig
from adaptlab.peft.lora import DEFORMABLE_TARGETS, LoraSpec, inject_lora, lora_params, merged_copy
from adaptlab.peft.methods import apply_method, load_trainable, save_trainable
from adaptlab.peft.seg_data import procedural_seg_dataset
from adaptlab.peft.seg_task import InstanceSegmentation, coco_mask_ap
from adaptlab.peft.run import run_peft
from adaptlab.train.loop import fit
from conftest import TINY_MODEL, copy_workflow

HEAD = DenseHeadConfig(dim=16, n_heads=2, n_levels=2, n_points=2, enc_layers=1, dec_layers=1, n_queries=4)
ALL_TARGETS = ("qkv", "proj", "fc1", "fc2") + DEFORMABLE_TARGETS


def seg_model(seed=0) -> InstanceSegmenter:
    torch.manual_seed(seed)
    return InstanceSegmenter(create_vit(TINY_MODEL, 0), 3, HEAD)


def outputs(model, x):
    out = model(x)
    return out if isinstance(out, tuple) else (out,)


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_freezing_weights_does_not_change_the_forward():
    """LoRA and adapters freeze the base weights, so the bitwise identity tests below compare a frozen model with a
    trainable one; that only holds if ``requires_grad`` does not change the forward. It did (~1 ulp, torch 2.14 /
    MKL on CPU) while ``ms_deform_attn_core`` returned a transposed view: on a strided 3-D input, matmul folds to one
    mm when the weight requires grad and runs bmm on the strided view otherwise, and the two round differently."""
    base = seg_model()
    frozen = copy.deepcopy(base).requires_grad_(False)
    for mode in ("eval", "train"):
        getattr(base, mode)(), getattr(frozen, mode)()
        for a, b in zip(outputs(base, X), outputs(frozen, X)):
            assert torch.equal(a, b), mode
    # the layout that makes this hold on every BLAS, not only on this machine's
    value, loc = torch.randn(2, 6 + 2, 2, 4), torch.rand(2, 3, 2, 2, 2, 2)
    assert ms_deform_attn_core(value, [(2, 3), (1, 2)], loc, torch.rand(2, 3, 2, 2, 2)).is_contiguous()


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_lora_zero_B_is_bit_identical_and_A_gets_no_gradient(target):
    base = seg_model()
    lora = inject_lora(copy.deepcopy(base), LoraSpec(targets=target, r=2, alpha=4))
    for mode in ("eval", "train"):
        getattr(base, mode)(), getattr(lora, mode)()
        # bitwise, not a tolerance: peft's unmerged forward is base_layer(x) + B(A(x))·scaling and adding the exact
        # zero that B = 0 gives leaves every float unchanged; the rest of the model is the same code on the same
        # weights (frozen, which must not matter: test_freezing_weights_does_not_change_the_forward)
        for a, b in zip(outputs(base, X), outputs(lora, X)):
            assert torch.equal(a, b), (target, mode)
    lora.train()
    logits, masks = lora(X)
    (logits.square().sum() + masks.square().sum()).backward()
    a_grads = [p.grad for n, p in lora.named_parameters() if "lora_A" in n]
    b_grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert a_grads and all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in a_grads)
    assert any(g.abs().sum() > 0 for g in b_grads)
    # trainable = exactly the LoRA matrices, counted by the formula r·(d_in + d_out)
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == lora_params(base, LoraSpec(target, 2, 4))


def test_lora_merge_equals_unmerged_and_scaling():
    base = seg_model()
    outs = {}
    for alpha in (2.0, 4.0):
        lora = inject_lora(copy.deepcopy(base), LoraSpec("qkv+sampling_offsets+value_proj", r=2, alpha=alpha))
        torch.manual_seed(3)
        with torch.no_grad():
            for n, p in lora.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        lora.eval()
        merged = merged_copy(lora).eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        for a, b in zip(outputs(lora, X), outputs(merged, X)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        outs[alpha] = lora(X)[0]
        # the weight delta is exactly (alpha / r)·B·A
        layer = lora.model.head.encoder[0].self_attn.value_proj
        delta = merged.head.encoder[0].self_attn.value_proj.weight - layer.base_layer.weight
        expect = (alpha / 2) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(delta, expect, atol=1e-6, rtol=1e-5)
    assert not torch.equal(outs[2.0], outs[4.0])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_zero_up_adapters_are_identity_and_counts_match(n):
    base = seg_model()
    points = attention_modules(base)
    assert len(points) == 2 + 3  # 2 ViT blocks + encoder self-attn, decoder self- and cross-attn
    adapted = copy.deepcopy(base)
    cfg = AdapterConfig(n_adapters=n, reduction=4)
    inject_adapters(adapted, cfg)
    base.eval(), adapted.eval()
    for a, b in zip(outputs(base, X), outputs(adapted, X)):
        assert torch.equal(a, b)
    added = sum(p.numel() for p in adapted.parameters()) - sum(p.numel() for p in base.parameters())
    # 2·d·m + m + d per adapter, N per insertion point: d = 32 (ViT), 16 (head); m = d / 4
    assert added == 2 * n * (2 * 32 * 8 + 8 + 32) + 3 * n * (2 * 16 * 4 + 4 + 16)
    assert added == sum(adapter_params(d, cfg) for _, _, d in points)
    assert added == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    bert = copy.deepcopy(base)
    inject_adapters(bert, AdapterConfig(n_adapters=n, init="bert"))
    assert not torch.equal(bert.eval()(X)[0], base(X)[0])


def test_deformable_dims_and_zero_offsets_one_hot_is_bilinear_sample():
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3)
    assert attn.sampling_offsets.out_features == 2 * 2 * 3 * 2 and attn.attention_weights.out_features == 2 * 2 * 3
    shapes = [(4, 5), (2, 3)]
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, 4 * 5 + 2 * 3, 8, generator=g)
    ref = torch.tensor([[0.3, 0.6], [0.71, 0.2]])  # (Q, 2) as (x, y)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_(), attn.sampling_offsets.bias.zero_()
        attn.attention_weights.weight.zero_()
        bias = torch.full((2, 2, 3), -1e9)  # (H, L, P): one-hot on level 1, point 2
        bias[:, 1, 2] = 0
        attn.attention_weights.bias.copy_(bias.flatten())
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(8)), lin.bias.zero_()
    out = attn(torch.randn(1, 2, 8), ref[None, :, None, :].expand(1, 2, 2, 2), value, shapes)
    # hand-written bilinear sample of level 1 (2×3) at the reference point, align_corners=False, zero padding
    lvl = value[0, 20:].view(2, 3, 8)
    for q, (x, y) in enumerate(ref.tolist()):
        px, py = x * 3 - 0.5, y * 2 - 0.5
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        acc = torch.zeros(8)
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                if 0 <= xi < 3 and 0 <= yi < 2:
                    acc += wx * wy * lvl[yi, xi]
        torch.testing.assert_close(out[0, q], acc, atol=1e-5, rtol=1e-5)
    # the core agrees with itself under explicit one-hot weights
    w = torch.zeros(1, 2, 2, 2, 3)
    w[..., 0, 0] = 1
    loc = ref[None, :, None, None, None, :].expand(1, 2, 2, 2, 3, 2)
    core = ms_deform_attn_core(value.view(1, 26, 2, 4), shapes, loc, w)
    assert core.shape == (1, 2, 8)


def _masks(boxes, size=16):
    out = np.zeros((len(boxes), size, size), dtype=bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        out[k, y0:y1, x0:x1] = True
    return out


def test_mask_ap_perfect_is_one_none_is_zero():
    gt = [_masks([(0, 6, 0, 6), (8, 14, 8, 15)]), _masks([(2, 10, 3, 9)])]
    labels = [np.array([0, 1]), np.array([2])]
    perfect = [[(int(lab), 0.9, m) for lab, m in zip(ls, ms)] for ms, ls in zip(gt, labels)]
    assert coco_mask_ap(gt, labels, perfect, 3) == pytest.approx({"mask_ap": 1.0, "mask_ap50": 1.0}, abs=1e-12)
    assert coco_mask_ap(gt, labels, [[], []], 3) == {"mask_ap": 0.0, "mask_ap50": 0.0}
    wrong = [[((int(lab) + 1) % 3, 0.9, m) for lab, m in zip(ls, ms)] for ms, ls in zip(gt, labels)]
    assert coco_mask_ap(gt, labels, wrong, 3)["mask_ap"] == 0.0


def _cls_setup(tiny_data, tiny_pretrained, arm, seed=0):
    from adaptlab.data.store import load_dataset
    from adaptlab.train.tasks import ImageClassification

    data = load_dataset(tiny_data)
    torch.manual_seed(seed)
    model = create_vit(TINY_MODEL, data.num_classes)
    load_model_weights(model, tiny_pretrained, skip_head=True)
    train_model = apply_method(model, arm, "classification")
    return train_model, ImageClassification(data, 16, torch.device("cpu"), seed)


ARMS = [{"method": "adapter", "n_adapters": 2, "reduction": 4, "init": "zero", "label": "a"},
        {"method": "lora", "targets": "qkv+fc1", "rank": 2, "alpha": 2.0, "dropout": 0.0, "label": "l"}]


@pytest.mark.parametrize("arm", ARMS, ids=["adapter", "lora"])
def test_frozen_weights_unchanged_and_trainable_checkpoint_reloads_exactly(tmp_path, tiny_data, tiny_pretrained, arm):
    from adaptlab.config import train_config

    model, task = _cls_setup(tiny_data, tiny_pretrained, arm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("head.weight") for n in trainable)
    cfg = train_config({"optimizer": "adamw", "lr": 1e-2, "steps": 4, "batch_size": 16, "eval_every": 4,
                        "ckpt_every": 0, "weight_decay": 0.05})
    fit(model, task, cfg, tmp_path / "run", device=torch.device("cpu"), config_id="x")
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_A" in n or "adapters" in n)
    save_trainable(model, tmp_path / "adapter.safetensors", arm)
    fresh, _ = _cls_setup(tiny_data, tiny_pretrained, arm, seed=5)  # another head init: the file must overwrite it
    load_trainable(fresh, tmp_path / "adapter.safetensors")
    model.eval(), fresh.eval()
    assert torch.equal(model(X), fresh(X))


def test_partial_and_linear_ordering(tiny_data, tiny_pretrained):
    pct = {}
    for arm in ({"method": "linear"}, {"method": "partial", "last_blocks": 1}, {"method": "full"}, ARMS[0]):
        m, _ = _cls_setup(tiny_data, tiny_pretrained, arm)
        pct[arm["method"]] = sum(p.numel() for p in m.parameters() if p.requires_grad) / sum(p.numel() for p in m.parameters())
    assert pct["linear"] < pct["adapter"] < pct["partial"] < pct["full"] == 1.0


def test_segmentation_task_learns_and_reports_metrics():
    ds = procedural_seg_dataset("t", {"image_size": 16, "n_train": 64, "n_val": 16, "n_test": 16, "seed": 3})
    x, m, y = ds.split("train")
    assert m.shape == (64, 3, 16, 16) and (y >= 0).sum(1).min() >= 1
    assert (m.astype(int).sum(1) <= 1).all()  # visible instance masks never overlap
    model = seg_model()
    task = InstanceSegmentation(ds, 16, torch.device("cpu"), 0)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for step in range(12):
        loss = task.loss(model, task.train_batch(step, 16))
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    metrics = task.evaluate(model, "val")
    assert set(metrics) == {"mask_ap", "mask_ap50", "miou"} and all(0 <= v <= 1 for v in metrics.values())


def test_class_from_mask_reads_the_query_mask_and_stays_frozen_in_peft_arms():
    from dataclasses import replace

    model = seg_model()
    assert hasattr(model.head, "mask_class_net")
    logits, masks = model(X)
    # the class logits now depend on the predicted masks: change the mask embedding and they move
    with torch.no_grad():
        model.head.mask_embed[-1].bias.add_(3.0)
    logits2, masks2 = model(X)
    assert not torch.equal(masks, masks2) and not torch.allclose(logits, logits2)
    # ... but no class gradient reaches the masks (the CNN reads them detached)
    model.zero_grad()
    model(X)[0].square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head.mask_embed.parameters())
    # without it the class logits ignore the mask embedding
    torch.manual_seed(0)
    plain = InstanceSegmenter(create_vit(TINY_MODEL, 0), 3, replace(HEAD, class_from_mask=False))
    before = plain(X)[0]
    with torch.no_grad():
        plain.head.mask_embed[-1].bias.add_(3.0)
    assert torch.equal(before, plain(X)[0])
    # part of the dense head: trains in partial, frozen with the rest of the dense head in adapter / LoRA arms
    for arm, trains in ((ARMS[0], False), (ARMS[1], False), ({"method": "partial", "last_blocks": 1}, True)):
        m = seg_model()
        apply_method(m, arm, "segmentation")
        assert all(p.requires_grad == trains for p in m.head.mask_class_net.parameters()), arm["method"]
    # masks too small for the CNN's two poolings: a clear error when the model is built, not a crash mid-run
    with pytest.raises(ValueError, match="mask_stride 8"):
        InstanceSegmenter(create_vit(TINY_MODEL, 0), 3, replace(HEAD, mask_stride=8))


def _coco_fixture(root):
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 20, "width": 30})
        anns.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 7, "iscrowd": 0,
                     "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
        rle = {"size": [20, 30], "counts": [20 * 20, 10 * 20]}  # uncompressed, column-major: last 10 columns
        anns.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 3, "iscrowd": 0, "segmentation": rle})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}
    (root / "train.json").write_text(json.dumps(doc))
    return root


def test_coco_loader_reads_polygons_and_rle_and_names_a_malformed_file(tmp_path):
    from adaptlab.peft.seg_data import coco_seg_dataset

    root = _coco_fixture(tmp_path)
    ds = coco_seg_dataset("c", {"train_json": str(root / "train.json"), "train_images": str(root / "img"),
                                "image_size": 10, "max_instances": 4, "val_frac": 0.2, "test_frac": 0.2})
    assert ds.classes == ["a", "b"]  # ascending category id
    x, m, y = ds.split("train")
    assert x.shape == (3, 10, 10, 3) and m.shape == (3, 4, 10, 10)
    assert sorted(y[0][y[0] >= 0].tolist()) == [0, 1]
    rle_mask = m[0][list(y[0]).index(0)]  # columns 20..29 of 30 → the right third after resize
    assert rle_mask[:, 7:].all() and not rle_mask[:, :6].any()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1}], "categories": []}))
    with pytest.raises(ValueError, match="bad.json"):
        coco_seg_dataset("c", {"train_json": str(bad), "train_images": str(root / "img")})
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: malformed COCO file"):
        coco_seg_dataset("c", {"train_json": str(bad), "train_images": str(root / "img")})


def _mini_config() -> dict:
    return {
        "device": "cpu",
        "datasets": {"tiny": {"kind": "procedural", "classes": 4, "image_size": 16, "n_train": 128, "n_val": 32,
                              "n_test": 32, "seed": 0}},
        "model": {k: v for k, v in TINY_MODEL.items() if k not in ("timm_name",)},
        "pretrain": {"dataset": "tiny", "train": {"optimizer": "adamw", "lr": 3e-3, "steps": 4, "batch_size": 32,
                                                   "eval_every": 4}},
        "trainable_sets": {"head": []},
        "finetune": {"defaults": {"steps": 2, "batch_size": 16, "eval_every": 2, "ckpt_every": 0},
                     "grids": {"g": {"study": "finetune", "datasets": ["tiny"], "seeds": [0], "lrs": [0.01],
                                     "optimizers": ["sgd"], "trainable": ["head"]}}},
        "peft": {
            "seeds": [0, 1],
            "train": {"steps": 3, "batch_size": 16, "eval_every": 3, "ckpt_every": 0},
            "head": {"dim": 16, "n_heads": 2, "n_levels": 2, "n_points": 2, "n_queries": 4},
            "latency_batch": 4,
            "seg_datasets": {"s": {"kind": "procedural", "image_size": 16, "n_train": 32, "n_val": 8, "n_test": 8},
                             "t": {"kind": "procedural", "domain": "shifted", "image_size": 16, "n_train": 32,
                                   "n_val": 8, "n_test": 8, "seed": 1}},
            "tasks": {"cls": {"kind": "classification", "dataset": "tiny", "arms": ["lora"]},
                      "seg": {"kind": "segmentation", "dataset": "t", "source": "s", "source_train": {"steps": 3},
                              "arms": ["adapter", "lora"]}},
            "arms": {"adapter": {"method": "adapter", "n_adapters": [2]},
                     "lora": {"method": "lora", "rank": [2], "targets": ["qkv", "sampling_offsets+value_proj"]}},
        },
    }


def test_peft_runs_records_and_tables(tmp_path, tiny_data, tiny_pretrained):
    """Every run of a mini grid in process (the DAG runs the same function per job), then the aggregation."""
    from adaptlab.aggregate import aggregate
    from adaptlab.config import validate_config
    from adaptlab.peft.seg_data import build_seg_dataset, save_seg_dataset
    from adaptlab.peft import specs as peft_specs
    from adaptlab.studies import expected_run_ids

    cfg = validate_config(_mini_config())
    specs = peft_specs(cfg)
    # deformable LoRA only on segmentation: 3 arms × 2 seeds on seg, 1 × 2 on cls, plus the source run
    assert len(specs) == 6 + 2 + 1 and "peft/cls/lora-sampling_offsets+value_proj-r2-a2/seed0" not in specs
    seg_files = {}
    for name, spec in cfg["peft"]["seg_datasets"].items():
        seg_files[name] = tmp_path / f"{name}.safetensors"
        save_seg_dataset(build_seg_dataset(name, spec), seg_files[name])
    res = tmp_path / "results"
    source = res / "runs/peft/seg/source/model.safetensors"
    for rid, spec in specs.items():  # the source run comes first
        data = tiny_data if spec["task"]["kind"] == "classification" else seg_files[spec["dataset"]]
        row = run_peft(spec, tiny_pretrained, data, res / "runs" / rid, source_path=source, device="cpu",
                       on_error="raise")
        assert row["status"] == "ok"
    ids = [i for i in expected_run_ids(cfg) if i.startswith("peft/")]
    aggregate(res, ids)
    with duckdb.connect(str(res / "adaptlab.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT method, trainable_pct, test_metric, latency_ms, latency_merged_ms, added_params, "
                           "added_params_formula, merge_max_abs_diff FROM runs WHERE kind = 'peft'").fetchall()
        assert len(rows) == 8
        for method, pct, metric, lat, lat_merged, added, formula, diff in rows:
            assert added == formula > 0 and 0 < pct < 100 and lat > 0 and 0 <= metric <= 1
            assert (lat_merged is not None and diff < 1e-4) if method == "lora" else lat_merged is None
        res_rows = con.execute("SELECT task, arm, n_ok, metric_mean, metric_std FROM peft_results").fetchall()
        assert len(res_rows) == 4 and all(n == 2 and 0 <= m <= 1 and s is not None for _, _, n, m, s in res_rows)
        assert con.execute("SELECT count(*) FROM peft_pareto").fetchone()[0] >= 2
        assert con.execute("SELECT n_adapters FROM peft_adapter_depth").fetchall() == [(2,)]
    assert (res / "figures/peft_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (res / "runs/peft/seg/lora-qkv-r2-a2/seed0/adapter.safetensors").is_file()


def test_peft_dag_plans_every_run(tmp_path):
    wd = copy_workflow(tmp_path / "wf")
    (wd / "mini.yaml").write_text(yaml.safe_dump(_mini_config()))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "peft_runs", "-n", "--cores", "2", "--configfile",
                           "mini.yaml"], cwd=wd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    counts = dict(re.findall(r"^(peft_\w+)\s+(\d+)$", out, flags=re.M))
    assert counts == {"peft_seg_data": "2", "peft_source": "1", "peft_run": "8", "peft_runs": "1"}
