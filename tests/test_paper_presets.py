"""Dress rehearsal of the paper preset (configs/paper.yaml) on CPU.

The preset is read as it is and only shrunk: every raw-data path points at a fixture written here in the real
on-disk format (CIFAR binary batches, CIFAR-10-C .npy, ImageFolder trees in their three layouts, COCO json +
images, MNIST idx, downsampled-ImageNet npz), the ViT weights are random timm ``test_vit`` weights written as
.safetensors and in the original .npz layout, and sizes/steps are tiny. Grids, arms, methods, benchmarks and
phases keep their structure (each list cut to its first values), so every rule of the preset runs at least one
job and the aggregation builds every table and claim. A preset edit that breaks a study fails here.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import duckdb
import numpy as np
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from adaptlab.config import load_config, validate_config
from adaptlab.models.vit import load_pretrained_weights
from conftest import REPO, copy_workflow, snakemake
from test_data_kinds import write_downsampled_imagenet, write_mnist

TIMM_TINY = "test_vit"  # timm's own 160 px, 6-block, width-64 ViT: the architecture of the fixture weights
PAPER = REPO / "configs/paper.yaml"


# ------------------------------------------------------------------------------------------------------------
# fixtures in the real on-disk formats


def _cifar_records(n: int, label_bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return b"".join(bytes(label_bytes(i)) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes() for i in range(n))


def write_cifar(root: Path) -> tuple[Path, Path]:
    c10, c100 = root / "cifar-10-batches-bin", root / "cifar-100-binary"
    c10.mkdir(parents=True)
    c100.mkdir(parents=True)
    for b in range(1, 6):
        (c10 / f"data_batch_{b}.bin").write_bytes(_cifar_records(8, lambda i: [i % 10], b))
    (c10 / "test_batch.bin").write_bytes(_cifar_records(10, lambda i: [i % 10], 9))
    (c100 / "train.bin").write_bytes(_cifar_records(40, lambda i: [i % 20, i % 100], 10))
    (c100 / "test.bin").write_bytes(_cifar_records(10, lambda i: [i % 20, i % 100], 11))
    return c10, c100


def write_cifar10c(root: Path, corruptions) -> Path:
    """<corruption>.npy (50 rows: 5 severities x 10) and labels.npy, the CIFAR-10-C layout."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for c in corruptions:
        np.save(root / f"{c}.npy", rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.arange(50) % 10)
    return root


def _png(path: Path, seed: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_image_folder(root: Path, splits: dict[str | None, int], classes: int = 3) -> Path:
    """``root/<split>/<class>/<i>.png`` (split None: class folders directly under root)."""
    for s, (split, per_class) in enumerate(splits.items()):
        for c in range(classes):
            for i in range(per_class):
                _png((root / split if split else root) / f"class{c}" / f"{i}.png", 1000 * s + 100 * c + i)
    return root


def write_coco(root: Path, n: int = 10) -> Path:
    """COCO instances json (a polygon and an uncompressed RLE per image) + the images."""
    images, anns = [], []
    for i in range(n):
        _png(root / "images" / f"{i}.png", i, size=(30, 20))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 20, "width": 30})
        anns.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 7, "iscrowd": 0,
                     "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
        anns.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 3, "iscrowd": 0,
                     "segmentation": {"size": [20, 30], "counts": [400, 200]}})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}
    (root / "train.json").write_text(json.dumps(doc))
    (root / "val.json").write_text(json.dumps(doc))
    return root


def write_vit_npz(model: torch.nn.Module, path: Path) -> None:
    """The original ViT release's .npz layout (what timm's ``_load_weights`` reads), from a timm model."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for j, ln in ((1, "LayerNorm_0"), (2, "LayerNorm_2")):
            w[p + ln + "/scale"], w[p + ln + "/bias"] = sd[b + f"norm{j}.weight"], sd[b + f"norm{j}.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].reshape(3, d, d), sd[b + "attn.qkv.bias"].reshape(3, h, d // h)
        for k, name in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[k].T.reshape(d, h, d // h)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[k]
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def write_weights(root: Path) -> dict[str, Path]:
    """Random test_vit weights: base and huge as .safetensors (timm state dict), large as the original .npz."""
    root.mkdir(parents=True)
    out = {}
    for name, fmt, seed in (("base", "safetensors", 0), ("large", "npz", 1), ("huge", "safetensors", 2)):
        torch.manual_seed(seed)
        model = timm.create_model(TIMM_TINY, pretrained=False, num_classes=21843 % 97)
        out[name] = root / f"{name}.{fmt}"
        if fmt == "npz":
            write_vit_npz(model, out[name])
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out[name]))
    return out


def write_fixtures(root: Path) -> dict[str, Path]:
    c10, c100 = write_cifar(root)
    corruptions = ("contrast", "gaussian_noise", "motion_blur", "snow", "speckle_noise")
    paths = {"cifar10": c10, "cifar100": c100, "cifar10c": write_cifar10c(root / "CIFAR-10-C", corruptions),
             "domainnet": root / "domainnet", "flowers102": write_image_folder(
                 root / "flowers102", {"train": 3, "val": 2, "test": 2}),
             "pets": write_image_folder(root / "pets", {"train": 4, "test": 2}),
             # ImageNet val as class folders (>= 150 images: its 1 % val split must hold one), ImageNet train/val
             "imagenet_val": write_image_folder(root / "imagenet/val", {None: 38}, classes=4),
             "imagenet": write_image_folder(root / "imagenet1k", {"train": 40, "val": 3}, classes=4),
             "mnist": write_mnist(root / "mnist", gz=True),
             # 1000 classes with 2 train and 1 val image each: every continual-ImageNet pair has images
             "imagenet32": write_downsampled_imagenet(root / "imagenet32", side=32, per_batch=1000, n_batches=2,
                                                      n_val=1000, classes=1000),
             "coco": write_coco(root / "coco"), "wixray": write_coco(root / "wixray", n=8)}
    for d in ("clipart", "sketch"):
        write_image_folder(root / "domainnet" / d, {None: 6})
    paths.update({f"weights_{k}": v for k, v in write_weights(root / "weights").items()})
    return paths


# ------------------------------------------------------------------------------------------------------------
# the preset, shrunk


def _tiny_train(train: dict) -> None:
    """Shrink the keys a train block sets (a grid's block without `steps` inherits the tiny defaults)."""
    for key, val in {"steps": 2, "batch_size": 4, "eval_batch_size": 8, "eval_every": 1, "ckpt_every": 1,
                     "warmup_steps": 1}.items():
        if key in train:
            train[key] = val


def tiny_paper_config(raw: dict, p: dict[str, Path]) -> dict:
    cfg = copy.deepcopy(raw)
    cfg.update(device="cpu", threads={"pretrain": 1, "finetune": 1})
    ds = cfg["datasets"]
    for name, spec in ds.items():  # every raw-data path → the fixture of the same layout
        kind = spec["kind"]
        if kind in ("cifar10", "cifar100", "mnist"):
            spec["path"] = str(p[kind])
        elif kind == "npy":
            spec["images"] = str(p["cifar10c"] / Path(spec["images"]).name)
            spec["labels"] = str(p["cifar10c"] / "labels.npy")
            spec["rows"] = [40, 50]  # severity 5 of the 10-per-severity fixture (the preset: [40000, 50000])
        elif kind == "downsampled_imagenet":
            spec["path"] = str(p["imagenet32"])
        elif kind == "imagefolder":
            src = Path(spec["path"])
            spec["path"] = str({"val": p["imagenet_val"], "imagenet": p["imagenet"], "flowers102": p["flowers102"],
                                "oxford-iiit-pet": p["pets"]}.get(src.name, p["domainnet"] / src.name))
            spec["image_size"] = min(spec.get("image_size", 64), 32)
    # the backbones: test_vit (160 px) with the fixture weights, one file per backbone and accepted format
    cfg["model"]["timm_name"] = TIMM_TINY
    cfg["pretrain"]["weights"] = str(p["weights_base"])
    for name, bb in cfg["backbones"].items():
        bb["model"]["timm_name"] = TIMM_TINY
        bb["pretrain"]["weights"] = str(p[f"weights_{name}"])
    ft = cfg["finetune"]
    _tiny_train(ft["defaults"])
    for grid in ft["grids"].values():  # every grid, dataset and configuration stays; one seed and lr
        grid.update(seeds=grid["seeds"][:1], lrs=grid["lrs"][:1])
        _tiny_train(grid.get("train", {}))
    cfg["plasticity"].update(n_pairs=8, batch_size=8)
    # Study 2: one seed, every arm and phase; the from-scratch architecture shrunk
    pc = cfg["precond"]
    pc["seeds"] = pc["seeds"][:1]
    pc["pretrain"]["model"].update(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    for phase in ("pretrain", "finetune"):
        _tiny_train(pc[phase]["train"])
    pc.update(probe={"every": 1, "batch_size": 4}, timing={"steps": 1, "repeats": 1, "batch_size": 2, "threads": 1})
    # Study 3: one seed; every arm with its first adapter count (both LoRA targets: two code paths)
    pe = cfg["peft"]
    pe.update(seeds=pe["seeds"][:1], threads=1, latency_batch=2)
    _tiny_train(pe["train"])
    pe["head"].update(dim=16, n_heads=2, n_points=2, enc_layers=1, dec_layers=1, n_queries=4)
    for name, spec in pe["seg_datasets"].items():
        root = p["coco"] if name == "coco_source" else p["wixray"]
        spec.update(train_json=str(root / "train.json"), val_json=str(root / "val.json"),
                    train_images=str(root / "images"), val_images=str(root / "images"), image_size=160,
                    max_instances=3)
    for task in pe["tasks"].values():
        _tiny_train(task.get("source_train", {}))
    pe["arms"]["adapter"]["n_adapters"] = pe["arms"]["adapter"]["n_adapters"][:1]
    # Study 4: the first K of each scheme, the stage-1 run, the first K2 of both arms; the official widths kept
    icl = cfg["icl"]
    icl["data"]["eval_size"] = 16
    _tiny_train(icl["train"])
    _tiny_train(icl["multimodal"]["train"])
    icl["unimodal"].update(Ks=icl["unimodal"]["Ks"][:1], seeds=[0])
    icl["multimodal"].update(Ks=icl["multimodal"]["Ks"][:1], seeds=[0])
    # Study 5: every benchmark, model and method, one seed, 2 tasks of 3 steps
    co = cfg["continual"]
    co["threads"] = 1
    for b in co["benchmarks"].values():
        b.update({"n": 16} if b["labels"] != "pairs" else {"per_class": 2})
    for m in co["models"].values():
        m.update(width=16, depth=1, **({"num_heads": 2} if m["kind"] == "vit" else {}))
    for g in co["grids"].values():
        g.update(seeds=g["seeds"][:1], tasks=2, steps=3, batch_size=4, summary_tasks=1, ntk_every=1, ntk_probe=2,
                 probe=8)
    return cfg


# ------------------------------------------------------------------------------------------------------------


def job_stats(dry_run_output: str) -> dict[str, int]:
    """rule → job count, from the "Job stats" table a dry run ends with."""
    table = dry_run_output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = [line.split() for line in table.strip().splitlines()[2:]]
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[0] != "total"}


def test_fixture_npz_weights_load_as_written(tmp_path):
    """The .npz writer is the inverse of timm's reader, so the rehearsal's `large` backbone is the written one."""
    paths = write_weights(tmp_path / "w")
    torch.manual_seed(1)
    src = timm.create_model(TIMM_TINY, pretrained=False, num_classes=21843 % 97)
    dst = timm.create_model(TIMM_TINY, pretrained=False, num_classes=5)
    assert load_pretrained_weights(dst, paths["large"]) == ["head.bias", "head.weight"]
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        if not k.startswith("head."):
            assert torch.equal(a, b), k
    assert load_pretrained_weights(dst, paths["base"]) == ["head.bias", "head.weight"]


def test_paper_preset_dry_run_plans_every_study_without_data(tmp_path):
    assert not Path("/data/cifar-10-batches-bin").exists()  # the point: planned without the data
    cfg = load_config(PAPER)
    assert {"plasticity", "precond", "peft", "icl", "continual"} <= set(cfg)
    wd = copy_workflow(tmp_path / "wf")
    proc = snakemake(wd, "-n", "--configfile", "configs/paper.yaml", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_stats(proc.stdout)
    assert counts["precond_train"] == 24 and counts["precond_timing"] == 1
    assert counts["icl_uni"] == 48 and counts["icl_mm"] == 24 and counts["continual_run"] == 117
    assert counts["finetune"] == 1356
    for target, rules in (("precond_runs", {"precond_train", "precond_timing"}), ("icl_runs", {"icl_uni", "icl_mm"}),
                          ("continual_runs", {"continual_run", "prepare_data"})):
        one = snakemake(wd, "-n", "--configfile", "configs/paper.yaml", "--", target, timeout=300)
        assert one.returncode == 0, one.stderr[-3000:]
        assert rules <= set(job_stats(one.stdout)) - {target} <= rules | {"prepare_data", "pretrain"}, target


# A sample of the shrunk preset's jobs with at least one job of every rule but `aggregate` (whose input is every
# expected run; its code runs in-process below on what exists): each Snakemake job costs ~6 s of interpreter and
# imports on 2 cores, and the whole DAG cut to one dataset and two configurations per grid (~85 jobs) took 6
# minutes. Every dataset kind and ImageFolder layout of the preset is prepared; `large` loads the .npz weights.
REHEARSAL = [
    "results/runs/components_cifar10c/cifar10c_motion_blur5/mha/sgd/lr0.001/seed0",     # npy, finetune
    "results/runs/size_large/domainnet_clipart/mha/sgd/lr0.003/seed0",                  # npz weights
    "results/runs/plasticity/analysis/base/domainnet_clipart",
    "results/runs/plasticity/linear_probe/base/domainnet_clipart",
    "results/runs/precond/timing",                       # after every precond_train job (4 arms x 2 phases)
    "results/runs/peft/seg/lora-sampling_offsets+value_proj-r8-a8/seed0",              # peft_source first
    "results/runs/icl/uni/ape/K128/seed0",
    "results/runs/icl/mm/pretrained/K128/seed0",         # after its stage-1 run icl/uni/rope/K8192
    "results/runs/continual/pmnist/perm_mnist/mlp/adam/seed0",
    "results/runs/continual/rlcifar_vit/rl_cifar10/vit/adam/seed0",
    "results/runs/continual/cimagenet/cimagenet32/mlp/adamo_1e-2/seed0",
    "results/runs/continual/rlcifar/rl_cifar10/mlp/redo/seed0",                         # resets across tasks
    "results/runs/icl/mm/scratch/K128/seed0",
]
REHEARSAL_DATA = ["cifar100", "flowers102", "pets", "imagenet_val"]  # the other kinds/layouts: by the runs above


def test_paper_preset_dress_rehearsal_runs_every_rule(tmp_path):
    from adaptlab.aggregate import aggregate
    from adaptlab.studies import expected_runs

    t0 = time.perf_counter()
    raw = yaml.safe_load(PAPER.read_text())
    tiny = tiny_paper_config(raw, write_fixtures(tmp_path / "data"))
    wd = copy_workflow(tmp_path / "wf")
    (wd / "configs/paper_tiny.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    cfg = validate_config(tiny)
    # the shrunk preset plans every rule the real one plans
    full = job_stats(snakemake(wd, "-n", "--configfile", "configs/paper.yaml", timeout=300).stdout)
    plan = snakemake(wd, "-n", "--configfile", "configs/paper_tiny.yaml", timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert set(job_stats(plan.stdout)) == set(full)
    targets = [f"{r}/summary.parquet" for r in REHEARSAL] + [f"results/data/{d}.safetensors" for d in REHEARSAL_DATA]
    proc = snakemake(wd, "--cores", "2", "--configfile", "configs/paper_tiny.yaml", "--", *targets, timeout=560)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ran = job_stats(proc.stdout + proc.stderr)
    assert set(ran) == set(full) - {"aggregate", "all"}, ran  # one job or more of every rule
    # the aggregation's code on what exists: every present run ok, the rest listed as missing, every claim's SQL
    # runs on the preset's structure
    expected = expected_runs(cfg)
    bad = dict((r, s) for r, s, _ in aggregate(str(wd / "results"), expected))
    present = {r for r in expected if (wd / "results/runs" / r / "summary.parquet").exists()}
    assert len(present) == 25 and set(bad.values()) == {"missing"} and set(bad) == set(expected) - present
    with duckdb.connect(str(wd / "results/adaptlab.duckdb"), read_only=True) as con:
        runs = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
        assert {r: s for r, s in runs.items() if s != "ok"} == {} and set(runs) == present
        assert {r[0] for r in con.execute("SELECT DISTINCT study FROM runs").fetchall()} >= {
            "plasticity", "precond", "peft", "icl", "continual"}
        bench = {r[0] for r in con.execute("SELECT DISTINCT benchmark FROM continual_task_metrics").fetchall()}
        assert bench == {"perm_mnist", "rl_cifar10", "cimagenet32"}
        n_test = con.execute("SELECT count(*) FROM continual_task_metrics WHERE metric = 'test_acc'").fetchone()[0]
        assert n_test == 2  # cimagenet: 2 tasks, each tested on its pair's held-out images
        phases = con.execute("SELECT phase, count(*) FROM precond_runs GROUP BY ALL ORDER BY 1").fetchall()
        assert phases == [("finetune", 4), ("pretrain", 4)]
        kappa = con.execute("SELECT count(DISTINCT run_id) FROM attention_condition").fetchone()[0]
        assert kappa == 8
        claims = con.execute("SELECT study, note FROM paper_claims").fetchall()
        assert {c[0] for c in claims} >= {"precond", "icl", "continual"} and all(n is None for _, n in claims)
    print(f"dress rehearsal: {len(present)} runs in {time.perf_counter() - t0:.0f} s")
