"""Run packs (adaptlab.packs, rules/packs.smk): membership, a pack's members' records, and the test preset packed
(and partly fused) end to end against the same preset one run per job."""
from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import pytest
import yaml

from adaptlab.packs import plan, run_pack
from adaptlab.records import PROVENANCE_COLUMNS, TIMING_COLUMNS, read_summary
from conftest import TINY_MODEL, copy_workflow, make_run, planned_jobs, snakemake


def _grid(datasets, lrs, seeds=(0,)):
    return {f"g/{d}/full/sgd/lr{lr}/seed{s}": {"grid": "g", "dataset": d, "lr": str(lr), "seed": str(s)}
            for d in datasets for lr in lrs for s in seeds}


def test_membership_is_a_function_of_each_runs_own_key():
    members = _grid(["a", "b"], [0.1, 0.2, 0.3])
    packs = plan("finetune", members, ("grid", "dataset"), size=lambda wc: 2)
    assert [p.name for p in packs] == ["finetune_pack_g_a_0", "finetune_pack_g_a_1", "finetune_pack_g_b_0",
                                       "finetune_pack_g_b_1"]
    assert [len(p.members) for p in packs] == [2, 1, 2, 1]
    assert plan("finetune", dict(reversed(members.items())), ("grid", "dataset"), size=lambda wc: 2) == packs
    # a new dataset adds its own packs and leaves the others exactly as they were
    more = plan("finetune", {**members, **_grid(["c"], [0.1, 0.2, 0.3])}, ("grid", "dataset"), size=lambda wc: 2)
    assert more[:4] == packs and len(more) == 6
    # size 1: the rule's own jobs, no pack
    assert plan("finetune", members, ("grid", "dataset"), size=lambda wc: 1) == []
    # sizes per key: only b is packed
    assert [p.name for p in plan("finetune", members, ("grid", "dataset"),
                                 size=lambda wc: 3 if wc["dataset"] == "b" else 1)] == ["finetune_pack_g_b_0"]


def _member(run: dict, out: Path, data, pre, on_error="record") -> dict:
    return {"rule": "finetune", "out_dir": str(out), "log": str(out / "job.log"),
            "input": {"model": str(pre), "data": str(data)},
            "params": {"run": json.dumps(run), "device": "cpu", "on_error": on_error}}


def test_a_pack_writes_each_runs_records_and_a_failing_run_does_not_stop_the_others(tiny_data, tiny_pretrained,
                                                                                      tmp_path, capfd):
    runs = [make_run(lr=lr) for lr in (0.01, 0.02, 0.03)]
    for r in runs:
        r["model"] = TINY_MODEL
    members = [_member(r, tmp_path / f"r{i}", tiny_data, tiny_pretrained) for i, r in enumerate(runs)]
    members[1]["input"]["data"] = str(tmp_path / "missing.safetensors")
    members[1]["params"]["on_error"] = "raise"
    with pytest.raises(SystemExit) as stop:
        run_pack(members, threads=1)
    assert stop.value.code == 1
    err = capfd.readouterr().err
    assert f"{tmp_path / 'r1'}: FileNotFoundError" in err and "1 of 3 runs raised" in err
    for i in (0, 2):  # the members after the failing one still trained, each with its own log and records
        row = read_summary(tmp_path / f"r{i}" / "summary.parquet")
        assert row["status"] == "ok" and row["lr"] == runs[i]["lr"]
        assert (tmp_path / f"r{i}" / "steps.parquet").exists()
        assert "=== " in (tmp_path / f"r{i}" / "job.log").read_text()
    assert "missing.safetensors" in (tmp_path / "r1" / "job.log").read_text()


# --- the test preset, packed, end to end --------------------------------------------------------------------

FUSED_GRIDS = {"main"}  # trains fused below: compared within tolerance, the rest exactly


def _packed(cfg: dict) -> None:
    grids = cfg["finetune"]["grids"]
    grids["main"].update(pack=4, fuse=True)
    grids["components"]["pack"] = 2
    cfg["icl"]["pack"] = 2
    cfg["icl"]["fuse"] = True
    cfg["icl"]["unimodal"]["seeds"] = [0, 1]  # two unimodal runs of one shape: a fused ICL pack
    for section in ("continual", "precond", "peft", "plasticity"):
        cfg[section]["pack"] = 4
    cfg["continual"]["fuse"] = True
    cfg["continual"]["grids"]["t"]["seeds"] = [0, 1]  # two seeds of each method: fused sequences


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    wd = copy_workflow(tmp_path_factory.mktemp("packed"))
    cfg = yaml.safe_load((wd / "configs/test.yaml").read_text())
    _packed(cfg)
    (wd / "configs/packed.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wd, "--cores", "2", "--configfile", "configs/packed.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wd / "run.log").write_text(proc.stdout + proc.stderr)
    return wd


def test_packed_preset_runs_fewer_jobs(packed):
    log = (packed / "run.log").read_text()
    jobs = planned_jobs(log)
    assert "continual_run" not in jobs and "icl_uni" not in jobs and "precond_train" not in jobs
    # the one grid left at pack 1 keeps the rule's own job
    assert jobs["finetune"] == ["results/runs/unstable/noisy/full/sgd/lr1e+06/seed0/summary.parquet"]
    assert {"finetune_pack_main_noisy_0", "finetune_pack_main_digits_0", "finetune_pack_components_noisy_0",
            "icl_uni_pack_all_0", "continual_run_pack_t_rl_0"} <= set(jobs)
    assert "train fused" in (packed / "results/runs/main/noisy/full/sgd/lr0.01/seed0/job.log").read_text()
    assert "train fused" in (packed / "results/runs/icl/uni/ape/K32/seed1/job.log").read_text()
    assert "train fused" in (packed / "results/runs/continual/t/rl/mlp/adamo/seed1/job.log").read_text()


def _metrics(row: dict) -> dict:
    skip = set(TIMING_COLUMNS) | set(PROVENANCE_COLUMNS) | {"precond_sec_per_step", "train_seconds", "latency_ms",
                                                             "latency_merged_ms"}
    return {k: v for k, v in row.items() if k not in skip}


def test_packed_records_equal_one_run_per_job(packed, pipeline_workdir):
    """Every run of the unpacked preset has the same record packed: exactly, or within float tolerance when it
    trained fused."""
    runs = sorted(p.parent.relative_to(pipeline_workdir / "results/runs")
                  for p in (pipeline_workdir / "results/runs").rglob("summary.parquet"))
    assert len(runs) >= 20
    for rid in runs:
        a = _metrics(read_summary(pipeline_workdir / "results/runs" / rid / "summary.parquet"))
        b = _metrics(read_summary(packed / "results/runs" / rid / "summary.parquet"))
        assert a.keys() == b.keys(), rid
        fused = rid.parts[0] in FUSED_GRIDS or rid.parts[0] in ("icl", "continual")  # icl/mm: fused stage-1 weights
        if not fused:
            assert a == b, rid
            continue
        for k, v in a.items():
            if isinstance(v, float) and isinstance(b[k], float) and not (math.isnan(v) and math.isnan(b[k])):
                tol = 1 / 32 + 1e-9 if "acc" in k else 1e-3
                assert b[k] == pytest.approx(v, abs=tol, rel=1e-3), (rid, k)
            elif k != "config_json":
                assert b[k] == v, (rid, k)


def test_packed_preset_makes_the_same_tables(packed, pipeline_workdir):
    def columns(wd):
        with duckdb.connect(str(wd / "results/adaptlab.duckdb"), read_only=True) as con:
            return con.execute("SELECT table_name, column_name FROM information_schema.columns "
                               "ORDER BY ALL").fetchall()

    assert columns(packed) == columns(pipeline_workdir)
    assert sorted(p.name for p in (packed / "results/figures").iterdir()) == \
        sorted(p.name for p in (pipeline_workdir / "results/figures").iterdir())


def test_one_lr_change_reruns_its_packs_and_retrains_only_the_changed_runs(packed):
    cfg = yaml.safe_load((packed / "configs/packed.yaml").read_text())
    cfg["finetune"]["grids"]["main"]["lrs"] = [0.01, 0.07]
    (packed / "configs/one_lr.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(packed, "-n", "--cores", "2", "--configfile", "configs/one_lr.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(planned_jobs(proc.stdout + proc.stderr)) == {"finetune_pack_main_noisy_0",
                                                             "finetune_pack_main_digits_0", "aggregate", "all"}
    proc = snakemake(packed, "--cores", "2", "--configfile", "configs/one_lr.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = packed / "results/runs/main"
    for d in ("noisy", "digits"):
        # the fused pack's members share one log text; restore messages name their run directory
        log = (runs / f"{d}/full/sgd/lr0.01/seed0/job.log").read_text()
        for t in ("full", "head"):
            assert f"results/runs/main/{d}/{t}/sgd/lr0.01/seed0: records of this exact run" in log
            assert f"results/runs/main/{d}/{t}/sgd/lr0.07/seed0: records of this exact run" not in log
            new = read_summary(runs / f"{d}/{t}/sgd/lr0.07/seed0/summary.parquet")
            assert new["status"] == "ok" and new["steps_done"] == 20 and new["resumed_from"] == 0


def test_pack_and_fuse_are_not_part_of_any_runs_spec():
    """Packing changes how runs are laid out in jobs, never a run's params or record key (no rerun, no retrain)."""
    from adaptlab.config import expand_runs, load_config, stable_json
    from adaptlab.studies import studies

    plain = load_config(Path(__file__).parents[1] / "configs/test.yaml")
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs/test.yaml").read_text())
    for section in ("plasticity", "precond", "peft", "icl", "continual"):
        cfg[section]["pack"] = 3
    cfg["icl"]["fuse"] = True
    for grid in cfg["finetune"]["grids"].values():
        grid.update(pack=3, fuse=True)
    for grid in cfg["continual"]["grids"].values():  # a grid's own layout, in place of the section's
        grid.update(pack=2, fuse=True)
    from adaptlab.config import validate_config

    packed = validate_config(cfg)
    for study in studies():
        a, b = study.specs(plain), study.specs(packed)
        assert {k: stable_json(v) for k, v in a.items()} == {k: stable_json(v) for k, v in b.items()}, study.SECTION
    assert [stable_json(r.as_dict()) for r in expand_runs(plain)] == [stable_json(r.as_dict()) for r in expand_runs(packed)]


def test_a_pack_asks_the_cluster_for_its_rules_resources(tmp_path):
    """Through profiles/slurm (dry run): a pack job gets its rule's set-resources entry, the runtime of its members
    one after another, fused too (a fused group is slower than one run: one member's runtime would be killed)."""
    import re

    wd = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wd / "configs/test.yaml").read_text())
    cfg["finetune"]["grids"]["main"]["pack"] = 4
    cfg["finetune"]["grids"]["components"].update(pack=2, fuse=True)
    cfg["continual"]["grids"]["t"].update(seeds=[0, 1], pack=2)  # a grid's own pack (continual.pack stays 1)
    (wd / "configs/packed.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wd, "-n", "--profile", "profiles/slurm", "--configfile", "configs/packed.yaml")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    entries = yaml.safe_load((wd / "profiles/slurm/config.yaml").read_text())["set-resources"]
    res = {rule: dict(kv.split("=", 1) for kv in found.split(", ")) for rule, found in
           re.findall(r"^[ \t]*rule (\w+_pack_\w+):\n(?:[ \t]+.*\n)*?[ \t]+resources: (.*)\n", log, flags=re.M)}
    # the continual grid's 4 runs (2 methods × 2 seeds) in 2 packs of 2, none left to the rule's own job
    assert set(res) == {"finetune_pack_main_noisy_0", "finetune_pack_main_digits_0", "finetune_pack_components_noisy_0",
                        "continual_run_pack_t_rl_0", "continual_run_pack_t_rl_1"}
    assert not re.search(r"^[ \t]*rule continual_run:\n", log, flags=re.M)
    entry = entries["finetune"]
    for rule, r in res.items():
        own = entries[rule.split("_pack_")[0]]
        assert r["slurm_partition"] == own["slurm_partition"] and r.get("gpu") == ("1" if own is entry else None)
        assert int(r["mem_mb"]) == own["mem_mb"] and int(r["cpus_per_task"]) == own["cpus_per_task"]
    assert int(res["finetune_pack_main_noisy_0"]["runtime"]) == 4 * entry["runtime"]
    assert int(res["finetune_pack_components_noisy_0"]["runtime"]) == 2 * entry["runtime"]  # fused: an upper bound
    assert int(res["continual_run_pack_t_rl_0"]["runtime"]) == 2 * entries["continual_run"]["runtime"]


def test_a_pack_has_its_highest_members_priority(tmp_path):
    """Dry run of the CPU preset: the packs of the unimodal ICL runs (stage 1) and of the continual ViT runs (the
    long ones) carry their rule's priority, so that Snakemake starts them before the short jobs that fill the tail."""
    import re

    wd = copy_workflow(tmp_path / "wf")
    proc = snakemake(wd, "-n", "--cores", "2", "continual_runs", "icl_runs", "--configfile", "configs/cpu.yaml")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    jobs = re.findall(r"^ *(?:local)?rule (\w+_pack_\w+):\n((?: {4,}\S.*\n)+)", log, flags=re.M)
    priority = {rule: int(m.group(1)) if (m := re.search(r"^ +priority: (\d+)", body, flags=re.M)) else 0
                for rule, body in jobs}
    assert {r for r in priority if r.startswith("icl_uni_")} == {f"icl_uni_pack_all_{i}" for i in range(4)}
    assert {r: p for r, p in priority.items() if p} == {
        **{f"icl_uni_pack_all_{i}": 1 for i in range(4)},
        **{f"continual_run_pack_vit_{b}_0": 1 for b in ("rl_digits", "perm_digits")}}
    assert sum(r.startswith("continual_run_pack_mlp_") for r in priority) == 6
    assert sum(r.startswith("icl_mm_") for r in priority) == 2
