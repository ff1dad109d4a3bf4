"""Config validation: bad values fail naming the key; defaults are filled; grids expand to the expected runs."""
from __future__ import annotations

import copy

import pytest
import yaml

from adaptlab.config import ConfigError, expand_runs, load_config, validate_config
from conftest import REPO


@pytest.fixture()
def base() -> dict:
    return yaml.safe_load((REPO / "configs/test.yaml").read_text())


@pytest.mark.parametrize("preset", ["config.yaml", "configs/test.yaml", "configs/paper.yaml"])
def test_presets_are_valid(preset):
    cfg = load_config(REPO / preset)
    assert expand_runs(cfg)


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, source="cfg.yaml")
    return str(info.value)


def test_unknown_top_level_key_rejected(base):
    base["lerning_rate"] = 0.1
    assert "lerning_rate" in _error(base)


def test_unknown_nested_key_names_its_path(base):
    base["finetune"]["grids"]["main"]["train"] = {"stepz": 5}
    msg = _error(base)
    assert "finetune.grids.main.train" in msg and "stepz" in msg


def test_negative_lr_names_the_index(base):
    base["finetune"]["grids"]["main"]["lrs"] = [0.01, -0.1]
    msg = _error(base)
    assert "finetune.grids.main.lrs[1]" in msg and "-0.1" in msg


def test_wrong_type_and_range(base):
    bad = copy.deepcopy(base)
    bad["model"]["depth"] = "four"
    assert "model.depth" in _error(bad)
    bad = copy.deepcopy(base)
    bad["finetune"]["defaults"]["momentum"] = 1.5
    assert "finetune.defaults.momentum" in _error(bad)
    bad = copy.deepcopy(base)
    bad["finetune"]["grids"]["main"]["optimizers"] = ["lamb"]
    assert "finetune.grids.main.optimizers[0]" in _error(bad)


def test_dataset_kind_specific_keys(base):
    base["datasets"]["digits"]["noise"] = 0.5  # a procedural-only key
    msg = _error(base)
    assert "datasets.digits" in msg and "noise" in msg
    base["datasets"]["digits"] = {"kind": "cifar10"}  # path is required
    assert "datasets.digits" in _error(base) and "path" in _error(base)


def test_cross_references(base):
    bad = copy.deepcopy(base)
    bad["finetune"]["grids"]["main"]["datasets"] = ["noisy", "imagenet"]
    assert "finetune.grids.main.datasets[1]" in _error(bad) and "imagenet" in _error(bad)
    bad = copy.deepcopy(base)
    bad["finetune"]["grids"]["main"]["trainable"] = ["full", "qkv_only"]
    assert "trainable[1]" in _error(bad) and "qkv_only" in _error(bad)
    bad = copy.deepcopy(base)
    bad["pretrain"]["init"] = "file"
    assert "pretrain.weights" in _error(bad)
    bad = copy.deepcopy(base)
    bad["finetune"]["grids"]["main"]["seeds"] = [0, 0]
    assert "finetune.grids.main.seeds" in _error(bad)


def test_defaults_are_filled(base):
    cfg = validate_config(base)
    assert cfg["finetune"]["on_error"] == "record"
    assert cfg["finetune"]["grids"]["main"]["optimizers"] == ["sgd"]
    assert cfg["model"]["mean"] == [0.5, 0.5, 0.5]
    assert cfg["pretrain"]["init"] == "scratch"


def test_grid_expansion(base):
    runs = expand_runs(validate_config(base))
    main = [r for r in runs if r.grid == "main"]
    assert len(main) == 2 * 1 * 2 * 2  # datasets × seeds × lrs × trainable
    assert len({r.run_id for r in runs}) == len(runs)
    r = main[0]
    # layering: loop defaults < finetune.defaults < grid.train < the grid point itself
    assert r.train["steps"] == base["finetune"]["defaults"]["steps"]
    assert r.train["lr"] == r.lr and r.train["optimizer"] == r.optimizer
    unstable = [r for r in runs if r.grid == "unstable"]
    assert unstable[0].train["clip_grad"] is None and unstable[0].study == "stress"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_validate_and_runs(tmp_path, capsys):
    from adaptlab.cli import main

    assert main(["validate", str(REPO / "configs/test.yaml")]) == 0
    assert "valid, 24 runs (11 in finetuning grids)" in capsys.readouterr().out
    assert main(["runs", str(REPO / "configs/test.yaml")]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 24 and "main/digits/head/sgd/lr0.05/seed0" in ids and "pretrain/base" in ids
    bad = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    bad["model"]["patch_size"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 1
    assert "model.patch_size" in capsys.readouterr().err
    # a study's own check (here: peft masks too small for the class-from-mask CNN) is a message, not a traceback
    bad = yaml.safe_load((REPO / "config.yaml").read_text())
    bad["peft"]["head"]["mask_stride"] = 16
    (tmp_path / "bad_peft.yaml").write_text(yaml.safe_dump(bad))
    for cmd in ("validate", "runs"):
        assert main([cmd, str(tmp_path / "bad_peft.yaml")]) == 1
        err = capsys.readouterr().err
        assert "peft.head" in err and "mask_stride 16" in err and "Traceback" not in err


def test_backbones_override_the_default_and_grids_pick_one():
    raw = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    raw["backbones"] = {"wide": {"model": {"embed_dim": 48}, "pretrain": {"train": {"steps": 7}}}}
    raw["finetune"]["grids"]["main"]["backbone"] = "wide"
    cfg = validate_config(raw)
    from adaptlab.config import backbone_names, pretrain_spec
    from adaptlab.studies import expected_run_ids

    assert backbone_names(cfg) == ["base", "wide"]
    wide, base = pretrain_spec(cfg, "wide"), pretrain_spec(cfg, "base")
    assert wide["model"]["embed_dim"] == 48 and wide["model"]["depth"] == base["model"]["depth"]
    assert wide["train"]["steps"] == 7 and wide["train"]["lr"] == base["train"]["lr"]  # deep merge
    assert {r.backbone for r in expand_runs(cfg) if r.grid == "main"} == {"wide"}
    assert {"pretrain/base", "pretrain/wide"} <= set(expected_run_ids(cfg))
    raw["finetune"]["grids"]["main"]["backbone"] = "huge"
    assert "finetune.grids.main.backbone" in _error(raw)
