"""End to end: the DAG on configs/test.yaml, its DuckDB tables, incremental reruns, bad configs and the CLI."""
from __future__ import annotations

import subprocess
from pathlib import Path

import duckdb
import pytest
import yaml

from adaptlab.config import load_config
from adaptlab.studies import STUDIES, expected_run_ids
from conftest import planned_jobs, snakemake


@pytest.fixture(scope="module")
def workdir(pipeline_workdir) -> Path:
    return pipeline_workdir


def test_pipeline_builds_database_tables_and_figures(workdir):
    cfg = load_config(workdir / "configs/test.yaml")
    expected = set(expected_run_ids(cfg))
    assert {"pretrain/base", "plasticity/analysis/base/noisy", "plasticity/linear_probe/base/noisy"} < expected
    db = workdir / "results/adaptlab.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert {"runs", "steps", "expected_runs", "run_status", "finetune_summary", "finetune_best"} <= tables
        runs = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
        assert set(runs) == expected
        assert runs["unstable/noisy/full/sgd/lr1e+06/seed0"] == "diverged"
        assert all(s == "ok" for r, s in runs.items() if not r.startswith("unstable/"))
        # every registered study ran (configs/test.yaml has a section for each)
        assert {r for (r,) in con.execute("SELECT DISTINCT study FROM runs").fetchall()} >= set(STUDIES)
    # every job left its log next to its records
    assert all((workdir / "results/runs" / r / "job.log").is_file() for r in expected)
    with duckdb.connect(str(db), read_only=True) as con:
        # the diverged run is listed by name, not dropped
        assert con.execute("SELECT run_id, status FROM run_status").fetchall() == [
            ("unstable/noisy/full/sgd/lr1e+06/seed0", "diverged")]
        # every claim of every study was checked (none of their SQL failed)
        claims = con.execute("SELECT study, verdict, note FROM paper_claims").fetchall()
        assert {c[0] for c in claims} == set(STUDIES) and all(note is None for *_, note in claims)
        assert {c[1] for c in claims} <= {"supported", "not supported", "not measured"}
        best = con.execute("SELECT dataset, trainable, best_lr, test_acc_mean FROM finetune_best "
                           "WHERE grid = 'main' ORDER BY ALL").fetchall()
        assert [(d, t) for d, t, *_ in best] == [("digits", "full"), ("digits", "head"), ("noisy", "full"),
                                                 ("noisy", "head")]
        assert all(0.0 <= acc <= 1.0 for *_, acc in best)
        # steps hold the val metrics at eval steps only
        n_eval = con.execute("SELECT count(*) FROM steps WHERE run_id = 'main/digits/full/sgd/lr0.01/seed0' "
                             "AND val_acc IS NOT NULL").fetchone()[0]
        assert n_eval == 2  # 20 steps, eval every 10
        row = con.execute("SELECT trainable_params, total_params, steps_done, peak_rss_mb, adaptlab_version "
                          "FROM runs WHERE run_id = 'main/digits/head/sgd/lr0.01/seed0'").fetchone()
        assert row[0] < row[1] and row[2] == 20 and row[3] > 0 and row[4]
    for name in ("run_status", "finetune_summary", "finetune_best"):
        assert (workdir / f"results/tables/{name}.csv").stat().st_size > 0
        assert (workdir / f"results/tables/{name}.md").read_text().startswith("| ")
    assert (workdir / "results/figures/learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_pipeline_runs_the_plasticity_study(workdir):
    with duckdb.connect(str(workdir / "results/adaptlab.duckdb"), read_only=True) as con:
        layers = con.execute("SELECT count(*), count(DISTINCT component), min(n_pairs) FROM plasticity_layers "
                             "WHERE dataset = 'noisy'").fetchone()
        assert layers == (2 * 5, 5, 64)  # 2 blocks x 5 components, 64 pairs each
        ft = con.execute("SELECT config, lp_acc, rg FROM plasticity_finetune ORDER BY config").fetchall()
        assert [c for c, *_ in ft] == ["ffn_norm", "mha"] and all(0 < lp <= 1 and rg is not None for _, lp, rg in ft)
        comps = con.execute("SELECT config, theoretical_rank, mean_plasticity FROM plasticity_components "
                            "ORDER BY config").fetchall()
        assert [c[:2] for c in comps] == [("ffn_norm", 4), ("mha", 1)] and all(c[2] > 0 for c in comps)
        assert con.execute("SELECT versus, n_datasets FROM plasticity_significance").fetchall() == [("ffn_norm", 1)]
    for name in ("plasticity_by_component", "plasticity_by_depth", "plasticity_relative_gain"):
        assert (workdir / f"results/figures/{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_nothing_to_do_when_unchanged(workdir):
    proc = snakemake(workdir, "-n", "--cores", "2", "--configfile", "configs/test.yaml")
    assert proc.returncode == 0
    assert planned_jobs(proc.stdout + proc.stderr) == {}


def _variant(workdir: Path, name: str, edit) -> str:
    cfg = yaml.safe_load((workdir / "configs/test.yaml").read_text())
    edit(cfg)
    (workdir / f"configs/{name}.yaml").write_text(yaml.safe_dump(cfg))
    return f"configs/{name}.yaml"


def test_changing_one_lr_reruns_exactly_its_runs(workdir):
    def edit(cfg):
        cfg["finetune"]["grids"]["main"]["lrs"] = [0.01, 0.07]

    proc = snakemake(workdir, "-n", "--cores", "2", "--configfile", _variant(workdir, "one_lr", edit))
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc.stdout + proc.stderr)
    assert set(jobs) == {"finetune", "aggregate", "all"}
    assert sorted(jobs["finetune"]) == sorted(
        f"results/runs/main/{d}/{t}/sgd/lr0.07/seed0/summary.parquet" for d in ("noisy", "digits")
        for t in ("full", "head"))


def test_changing_a_shared_value_reruns_its_grid_only(workdir):
    def edit(cfg):
        cfg["finetune"]["grids"]["main"]["train"] = {"steps": 25}

    proc = snakemake(workdir, "-n", "--cores", "2", "--configfile", _variant(workdir, "steps", edit))
    jobs = planned_jobs(proc.stdout + proc.stderr)
    assert set(jobs) == {"finetune", "aggregate", "all"}
    assert len(jobs["finetune"]) == 8 and all("/main/" in o for o in jobs["finetune"])


def test_bad_config_fails_before_any_job_naming_the_key(workdir):
    def edit(cfg):
        cfg["finetune"]["grids"]["main"]["lrs"] = [0.01, -3]

    proc = snakemake(workdir, "--cores", "2", "--configfile", _variant(workdir, "bad", edit))
    assert proc.returncode != 0
    assert "finetune.grids.main.lrs[1]" in proc.stderr
    assert "rule finetune" not in proc.stdout + proc.stderr


def test_sql_cli_queries_the_database(workdir):
    db = str(workdir / "results/adaptlab.duckdb")
    proc = subprocess.run(["adaptlab", "sql", "--db", db, "SELECT status, count(*) AS n FROM runs GROUP BY status "
                           "ORDER BY status"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| diverged | 1 |" in proc.stdout and "| ok | 23 |" in proc.stdout
    proc = subprocess.run(["adaptlab", "sql", "--csv", "--db", db, "SELECT count(*) AS n FROM expected_runs"],
                          capture_output=True, text=True)
    assert proc.stdout.splitlines() == ["n", "24"]
    proc = subprocess.run(["adaptlab", "sql", "--db", db, "SELECT * FROM no_such_table"], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "no_such_table" in proc.stderr


def test_aggregate_cli_reports_missing_runs(workdir, tmp_path):
    # a partial grid: drop one run's records, rebuild outside Snakemake, the run is listed as missing
    import shutil

    partial = tmp_path / "results"
    shutil.copytree(workdir / "results", partial)
    shutil.rmtree(partial / "runs/main/noisy/head/sgd/lr0.05")
    proc = subprocess.run(["adaptlab", "aggregate", "--configfile", str(workdir / "configs/test.yaml"),
                           "--results", str(partial)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "missing   main/noisy/head/sgd/lr0.05/seed0" in proc.stdout
    assert "diverged  unstable/noisy/full/sgd/lr1e+06/seed0" in proc.stdout


def test_report_contains_tables_and_figures(workdir):
    proc = snakemake(workdir, "--cores", "1", "--configfile", "configs/test.yaml", "--report", "results/report.html")
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (workdir / "results/report.html").read_text(errors="replace")
    assert "finetune_best.csv" in html and "learning_curves.png" in html
    # it opens with the paper claims and the run states (results/report.rst, written by the aggregation)
    assert "Paper claims" in html and "Run states" in html and "ln_below_attention_ffn" in html
