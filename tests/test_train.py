"""The shared training loop: freezing, schedule, determinism, divergence, failures, checkpoints and resume."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptlab.config import train_config
from adaptlab.continual.bench import MLP
from adaptlab.data.store import load_dataset
from adaptlab.models.vit import create_vit, load_model_weights, load_pretrained_weights
from adaptlab.records import TIMING_COLUMNS, read_summary
from adaptlab.runner import run_finetune, run_pretrain
from adaptlab.train.checkpoint import load_checkpoint, save_checkpoint
from adaptlab.train.loop import fit
from adaptlab.train.optim import build_optimizer, lr_factor
from adaptlab.train.tasks import ImageClassification
from adaptlab.train.trainable import select_trainable
from conftest import TINY_MODEL, make_run

CPU = torch.device("cpu")


def _finetuned(tiny_data, tiny_pretrained, tmp_path, patterns, optimizer, **train):
    data = load_dataset(tiny_data)
    torch.manual_seed(0)
    model = create_vit(TINY_MODEL, data.num_classes)
    load_model_weights(model, tiny_pretrained, skip_head=True)
    names = select_trainable(model, patterns)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = train_config({"steps": 8, "batch_size": 16, "eval_every": 4, "optimizer": optimizer, "lr": 0.05, **train})
    task = ImageClassification(data, 16, CPU, seed=0)
    result = fit(model, task, cfg, tmp_path, device=CPU, config_id="x")
    return model, names, before, result


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adamo"])
@pytest.mark.parametrize("patterns", [(), ("blocks.*.attn.*",)])
def test_frozen_weights_stay_bit_identical(tiny_data, tiny_pretrained, tmp_path, optimizer, patterns):
    # weight decay and momentum would move frozen tensors if they ever entered the optimizer
    model, names, before, result = _finetuned(tiny_data, tiny_pretrained, tmp_path, patterns, optimizer,
                                              weight_decay=0.1)
    assert result.status == "ok"
    trained = set(names)
    assert {"head.weight", "head.bias"} <= trained
    assert all(n.startswith("head.") or ".attn." in n for n in trained)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name in trained:
            assert not torch.equal(p.detach(), before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"
            assert p.grad is None


def test_optimizer_only_sees_trainable_parameters():
    model = create_vit(TINY_MODEL, 3)
    select_trainable(model, ["blocks.0.*"])
    opt = build_optimizer(model.parameters(), train_config({"optimizer": "adamw"}))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="match no parameter"):
        select_trainable(model, ["blocks.99.*"])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adamo"])
def test_fused_adam_switch_matches_the_loop_at_rounding_level(optimizer):
    """train.fused_adam: torch's fused kernel on the CPU, the same trajectory as the default per-tensor loop within
    float rounding; left out, nothing is fused (CPU results stay bit for bit)."""
    cfg = train_config({"optimizer": optimizer, "lr": 3e-3, "weight_decay": 0.01 if optimizer != "adamo" else 0.0,
                        "isometry_lambda": 0.05})
    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4
    start, trajectories = None, []
    for fused in (False, True):
        torch.manual_seed(0)
        model = MLP(8, 32, 2, 4)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(list(model.named_parameters()), {**cfg, "fused_adam": True} if fused else cfg)
        assert all(bool(g.get("fused")) == fused for g in opt.param_groups)
        losses = []
        for step in range(30):
            idx = torch.arange(step, step + 16) % 64
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        trajectories.append(({n: p.detach().clone() for n, p in model.named_parameters()}, losses))
    (loop, loop_losses), (fused, fused_losses) = trajectories
    assert max((p - start[n]).abs().max().item() for n, p in loop.items()) > 1e-2  # the steps moved the weights
    torch.testing.assert_close(fused_losses, loop_losses, atol=1e-5, rtol=1e-5)
    for name, p in loop.items():
        torch.testing.assert_close(fused[name], p, atol=1e-5, rtol=1e-4, msg=name)


def test_unclipped_run_logs_the_same_norms_and_weights_as_a_clip_that_never_bites(tmp_path):
    """clip_grad None skips clip_grad_norm_'s rescale by 1 but logs the same pre-clip norm; nothing else changes."""
    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4

    class Task:
        selection_metric = "acc"

        def train_batch(self, step, batch_size):
            idx = torch.arange(step, step + batch_size) % 64
            return x[idx], y[idx]

        def loss(self, model, batch):
            return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

        def evaluate(self, model, split, autocast):
            with torch.no_grad():
                return {"acc": (model(x).argmax(1) == y).float().mean().item()}

    out = []
    for clip in (None, 1e9):
        torch.manual_seed(0)
        model = MLP(8, 32, 2, 4)
        cfg = train_config({"optimizer": "adam", "lr": 3e-3, "steps": 20, "batch_size": 16, "clip_grad": clip,
                            "eval_every": 10, "ckpt_every": 0, "warmup_steps": 0})
        res = fit(model, Task(), cfg, tmp_path / str(clip), device=torch.device("cpu"), config_id=str(clip))
        assert res.status == "ok" and res.steps_done == 20
        out.append((res.log, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (log_none, w_none), (log_big, w_big) = out
    assert log_none["grad_norm"] == log_big["grad_norm"] and log_none["loss"] == log_big["loss"]
    assert all(g > 0 for g in log_none["grad_norm"])
    assert all(torch.equal(w_none[n], w_big[n]) for n in w_none)


def test_runs_flush_denormals():
    """A run's process flushes denormal floats (x86's slow path for Adam moments decaying at dead units)."""
    from adaptlab.train.device import set_cpu_math

    before = torch.get_num_threads()
    try:
        set_cpu_math(1)
        assert (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0  # 1e-40: a denormal, flushed
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)
    assert (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() != 0.0


def test_lr_schedule_warmup_then_cosine():
    cfg = train_config({"steps": 100, "warmup_steps": 10, "min_lr_factor": 0.1})
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # linear warmup rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine decays
    assert f[-1] == pytest.approx(0.1, abs=2e-3)
    frac = train_config({"steps": 200, "warmup_steps": 0.1})
    assert lr_factor(19, frac) == pytest.approx(1.0)  # a fraction < 1 is a share of the steps


def _metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_COLUMNS}


def test_same_seed_same_summary_different_seed_differs(tiny_data, tiny_pretrained, tmp_path):
    rows = [run_finetune(make_run(seed=s), TINY_MODEL, tiny_pretrained, tiny_data, tmp_path / f"r{i}", device="cpu")
            for i, s in enumerate([0, 0, 1])]
    assert rows[0]["status"] == "ok"
    assert _metrics(rows[0]) == _metrics(rows[1])
    assert rows[0]["final_loss"] != rows[2]["final_loss"]
    on_disk = read_summary(tmp_path / "r0" / "summary.parquet")
    assert _metrics(on_disk) == _metrics(rows[0])
    assert json.loads(on_disk["config_json"])["run"]["lr"] == 0.01
    assert not (tmp_path / "r0" / "ckpt.safetensors").exists()  # cleaned up after a finished run


def test_diverging_run_is_recorded_not_raised(tiny_data, tiny_pretrained, tmp_path):
    row = run_finetune(make_run(lr=1e6, clip_grad=None), TINY_MODEL, tiny_pretrained, tiny_data, tmp_path,
                       device="cpu")
    assert row["status"] == "diverged"
    assert row["test_acc"] is None and row["steps_done"] < 12
    summary = read_summary(tmp_path / "summary.parquet")
    assert summary["status"] == "diverged"
    assert (tmp_path / "steps.parquet").exists()


def test_exception_is_recorded_as_failed_or_raised(tiny_pretrained, tmp_path):
    row = run_finetune(make_run(), TINY_MODEL, tiny_pretrained, tmp_path / "missing.safetensors", tmp_path / "a",
                       device="cpu")
    assert row["status"] == "failed" and "missing.safetensors" in row["error"]
    assert read_summary(tmp_path / "a" / "summary.parquet")["status"] == "failed"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        run_finetune(make_run(), TINY_MODEL, tiny_pretrained, tmp_path / "missing.safetensors", tmp_path / "b",
                     device="cpu", on_error="raise")


def test_write_run_nulls_a_failed_runs_study_columns_and_rejects_an_incomplete_ok_row(tiny_pretrained, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adaptlab.records import write_run

    study = [pa.field("study_metric", pa.float64())]
    failed = run_finetune(make_run(), TINY_MODEL, tiny_pretrained, tmp_path / "missing.safetensors", tmp_path / "a",
                          device="cpu")
    write_run(tmp_path / "b", dict(failed), extra_fields=study)
    summary = read_summary(tmp_path / "b" / "summary.parquet")
    assert summary["status"] == "failed" and "study_metric" in summary and summary["study_metric"] is None
    assert pq.read_table(tmp_path / "b" / "steps.parquet").num_rows == 0
    with pytest.raises(ValueError, match="study_metric"):  # an ok run must say every column
        write_run(tmp_path / "c", {**failed, "status": "ok"}, extra_fields=study)


def test_checkpoint_roundtrip_restores_optimizer_and_rng(tmp_path):
    model = create_vit(TINY_MODEL, 3)
    opt = build_optimizer(model.parameters(), train_config({"optimizer": "adamw"}))
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    log = {"step": [1.0], "loss": [0.5]}
    save_checkpoint(tmp_path / "c.safetensors", model, opt, log, {"step": 1})
    expected_rand = torch.rand(3)
    model2 = create_vit(TINY_MODEL, 3)
    opt2 = build_optimizer(model2.parameters(), train_config({"optimizer": "adamw"}))
    meta, log2 = load_checkpoint(tmp_path / "c.safetensors", model2, opt2)
    assert meta == {"step": 1} and log2 == log
    assert torch.equal(torch.rand(3), expected_rand)  # the RNG continues where it was saved
    for (k, v), (_, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(v, v2), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for key in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][key]), torch.as_tensor(s2[i][key])), (i, key)


KILL_SCRIPT = """
import os, signal, sys, json
sys.path.insert(0, {tests!r})
from conftest import TINY_MODEL, make_run
from adaptlab.runner import run_finetune
def die(step):
    if step == 10:
        os.kill(os.getpid(), signal.SIGKILL)
run_finetune(make_run(optimizer={opt!r}, lr=0.003), TINY_MODEL, {pre!r}, {data!r}, {out!r}, device="cpu", on_step=die)
"""


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adamo"])
def test_killed_run_resumes_to_the_same_summary(tiny_data, tiny_pretrained, tmp_path, optimizer):
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=tests_dir, opt=optimizer, pre=str(tiny_pretrained), data=str(tiny_data),
                                out=str(killed))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (killed / "ckpt.safetensors").exists() and not (killed / "summary.parquet").exists()
    resumed = run_finetune(make_run(optimizer=optimizer, lr=0.003), TINY_MODEL, tiny_pretrained, tiny_data, killed,
                           device="cpu")
    assert resumed["resumed_from"] == 8  # checkpoints every 4 steps; killed after step 10
    straight = run_finetune(make_run(optimizer=optimizer, lr=0.003), TINY_MODEL, tiny_pretrained, tiny_data,
                            tmp_path / "straight", device="cpu")
    assert _metrics(resumed) == _metrics(straight)
    import pyarrow.parquet as pq

    a = pq.read_table(killed / "steps.parquet").to_pylist()
    b = pq.read_table(tmp_path / "straight" / "steps.parquet").to_pylist()
    assert a == b and len(a) == 12


def test_checkpoint_of_another_config_is_not_resumed(tiny_data, tiny_pretrained, tmp_path):
    run_finetune(make_run(lr=0.003, keep_weights=True), TINY_MODEL, tiny_pretrained, tiny_data, tmp_path, device="cpu")
    # plant a checkpoint of a different config: a run with another lr must start from scratch
    model = create_vit(TINY_MODEL, 4)
    opt = build_optimizer(model.parameters(), train_config({}))
    save_checkpoint(tmp_path / "ckpt.safetensors", model, opt, {"step": []}, {"step": 8, "config_id": "other"})
    row = run_finetune(make_run(lr=0.004), TINY_MODEL, tiny_pretrained, tiny_data, tmp_path, device="cpu")
    assert row["resumed_from"] == 0 and row["status"] == "ok"


def test_pretrained_weights_load_from_local_safetensors_only(tmp_path):
    source = create_vit(TINY_MODEL, 5)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    target = create_vit(TINY_MODEL, 3)
    head_before = target.head.weight.clone()
    fresh = load_pretrained_weights(target, tmp_path / "w.safetensors")
    assert fresh == ["head.bias", "head.weight"]
    assert torch.equal(target.head.weight, head_before)
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(target.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_pretrained_weights(target, tmp_path / "nothere.safetensors")
    (tmp_path / "w.pth").write_bytes(b"\x80\x04not a real pickle")
    with pytest.raises(ValueError, match="pickled checkpoints are not loaded"):
        load_pretrained_weights(target, tmp_path / "w.pth")


def test_pretrain_from_missing_weights_file_names_the_path(tmp_path):
    spec = {"backbone": "base", "dataset": "x", "init": "file", "weights": str(tmp_path / "vit_b16.safetensors"), "seed": 0,
            "model": TINY_MODEL, "train": train_config({})}
    with pytest.raises(FileNotFoundError, match="pretrain.weights: .*vit_b16.safetensors"):
        run_pretrain(spec, None, tmp_path / "out", device="cpu")


def test_pretrain_from_file_writes_a_headless_backbone(tmp_path):
    source = create_vit(TINY_MODEL, 5)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = {"backbone": "base", "dataset": "x", "init": "file", "weights": str(tmp_path / "w.safetensors"), "seed": 0,
            "model": {**TINY_MODEL, "timm_name": None}, "train": train_config({})}
    row = run_pretrain(spec, None, tmp_path / "out", device="cpu")
    assert row["status"] == "ok" and row["steps_done"] == 0
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith("head.") and v.numel() for k, v in saved.items())
    assert torch.equal(saved["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])
    assert math.isclose(row["total_params"], sum(v.numel() for k, v in source.state_dict().items()
                                                    if not k.startswith("head.")))
