"""The study contract: every registered study follows it, and the registry agrees with the files around it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from adaptlab.config import ConfigError, load_config, validate_config
from adaptlab.studies import STUDIES, Study, run_id, studies
from adaptlab.records import read_summary
from conftest import REPO, copy_workflow, planned_jobs, snakemake

SRC = REPO / "src" / "adaptlab"
TEST_PRESET = yaml.safe_load((REPO / "configs/test.yaml").read_text())
PROFILE = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())


def rule_blocks(smk: str) -> dict[str, str]:
    """rule name -> its body, from a rules file."""
    return dict(re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", smk, flags=re.M))


def record_rules(smk: str) -> list[str]:
    """The rules that run something and write a run record (an output named ``summary``)."""
    return [name for name, body in rule_blocks(smk).items() if re.search(r"^\s+summary=", body, flags=re.M)]


@pytest.mark.parametrize("section", STUDIES)
def test_every_registered_study_has_its_files_preset_section_and_cluster_resources(section):
    module = next(s for s in studies() if s.SECTION == section)
    assert isinstance(module, Study), f"adaptlab.{section} does not define the whole Study surface"
    assert module.__name__ == f"adaptlab.{section}"
    assert (SRC / section / "run.py").is_file()
    assert (SRC / "schemas" / f"{section}.schema.yaml").is_file()
    assert section in TEST_PRESET, f"configs/test.yaml has no {section} section"
    smk = (REPO / "rules" / f"{section}.smk").read_text()
    runs = record_rules(smk)
    assert runs, f"rules/{section}.smk has no rule that writes a run record"
    for rule in runs:
        assert rule in PROFILE["set-resources"], f"profiles/slurm: no set-resources entry for rule {rule}"
        assert "log:" in rule_blocks(smk)[rule], f"rule {rule} has no log:"


def test_registry_matches_schema_fragments_and_every_rule_has_a_log():
    fragments = {f.name.removesuffix(".schema.yaml") for f in (SRC / "schemas").glob("*.schema.yaml")}
    assert fragments == set(STUDIES)
    for smk in (REPO / "rules").glob("*.smk"):
        for rule, body in rule_blocks(smk.read_text()).items():
            if "script:" in body:
                assert "log:" in body, f"{smk.name}: rule {rule} has no log:"
    for core in ("pretrain", "finetune"):
        assert core in PROFILE["set-resources"]


def test_run_ids_round_trip_through_their_patterns():
    """The id of every run of the test preset is its study's RUN_IDS pattern filled in: the rules use the same pattern
    as their wildcard path, so parsing an id with it and formatting again gives the id back."""
    cfg = load_config(REPO / "configs/test.yaml")
    for study in studies():
        ids = study.specs(cfg)
        assert ids, study.SECTION
        for rid, spec in ids.items():
            matches = []
            for kind, pattern in study.RUN_IDS.items():
                regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern))
                m = re.fullmatch(regex, rid)
                if m:
                    matches.append(kind)
                    assert run_id(study, kind, **m.groupdict()) == rid
            assert len(matches) == 1, (rid, matches)
            assert spec.get("run_id", rid) == rid


def test_a_study_check_fails_in_validate_config_naming_the_key(tmp_path):
    """One error path: a value only a study's own check rejects fails in validate_config, `adaptlab validate` and
    `snakemake -n` alike, naming the key, before any job."""
    bad = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    bad["precond"]["baseline"] = "nope"
    with pytest.raises(ConfigError, match=r"precond\.baseline"):
        validate_config(bad)
    wd = copy_workflow(tmp_path / "wf")
    (wd / "configs/bad.yaml").write_text(yaml.safe_dump(bad))
    cli = subprocess.run(["adaptlab", "validate", "configs/bad.yaml"], cwd=wd, capture_output=True, text=True)
    assert cli.returncode == 1 and "precond.baseline" in cli.stderr
    sm = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", "configs/bad.yaml"], cwd=wd,
                        capture_output=True, text=True, timeout=300)
    assert sm.returncode != 0 and "precond.baseline: 'nope' is not one of precond.arms" in sm.stdout + sm.stderr
    assert "rule precond_train" not in sm.stdout + sm.stderr


def test_workflow_parse_imports_no_torch_timm_scipy_or_matplotlib():
    """What Snakemake imports to parse the workflow stays light: it is paid per snakemake call and per cluster job."""
    code = ("import sys\n"
            "from adaptlab.config import load_config\n"
            "from adaptlab.studies import studies, expected_run_ids\n"
            "import adaptlab.aggregate, adaptlab.joblog\n"
            "for preset in ('config.yaml', 'configs/paper.yaml', 'configs/test.yaml'):\n"
            "    expected_run_ids(load_config(preset))\n"
            "print(sorted(m for m in ('torch', 'timm', 'scipy', 'matplotlib', 'sklearn') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_job_log_keeps_output_and_the_traceback(tmp_path, capsys):
    from adaptlab.joblog import job_log

    path = tmp_path / "run" / "job.log"
    with pytest.raises(RuntimeError):
        with job_log(path):
            print("training step 1")
            raise RuntimeError("out of memory")
    text = path.read_text()
    assert "training step 1" in text and "RuntimeError: out of memory" in text and "Traceback" in text
    assert "training step 1" in capsys.readouterr().out  # still on the terminal too


def test_run_skeleton_records_or_raises_and_writes_tables_on_either_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adaptlab.records import read_summary
    from adaptlab.runner import execute

    identity = {"run_id": "x/run", "kind": "x", "study": "x", "grid": None, "backbone": None, "dataset": None,
                "seed": 0, "lr": None, "optimizer": None, "trainable": None}
    extra_fields = [pa.field("x_metric", pa.float64())]
    schema = pa.schema([pa.field("run_id", pa.string()), pa.field("v", pa.int64())])
    written = []

    def failing(run):
        run.extra["x_metric"] = 0.5
        run.tables["x_raw"] = (rows := [], schema)
        run.after.append(lambda: written.append(run.out_dir))
        rows.append({"run_id": "x/run", "v": 1})
        deep_inside_the_body()

    def deep_inside_the_body():
        raise RuntimeError("boom")

    kw = {"steps_planned": 7, "device": "cpu", "extra_fields": extra_fields}
    row = execute(identity, {"a": 1}, tmp_path / "rec", failing, **kw)
    assert row["status"] == "failed" and "RuntimeError: boom" in row["error"] and row["x_metric"] == 0.5
    assert "deep_inside_the_body" in row["error"]  # the recorded frames end where it failed, not in the plumbing
    summary = read_summary(tmp_path / "rec" / "summary.parquet")
    assert summary["status"] == "failed" and summary["steps_planned"] == 7 and summary["config_json"] == '{"a":1}'
    assert pq.read_table(tmp_path / "rec" / "x_raw.parquet").to_pylist() == [{"run_id": "x/run", "v": 1}]
    assert written == [tmp_path / "rec"]
    with pytest.raises(RuntimeError, match="boom"):
        execute(identity, {}, tmp_path / "raise", failing, on_error="raise", **kw)
    assert not (tmp_path / "raise" / "summary.parquet").exists()
    with pytest.raises(RuntimeError, match="boom"):  # recorded first, then raised: for runs others depend on
        execute(identity, {}, tmp_path / "both", failing, reraise=True, **kw)
    assert read_summary(tmp_path / "both" / "summary.parquet")["status"] == "failed"

    def ok(run):
        run.status = "ok"
        run.extra["x_metric"] = 0.9

    row = execute(identity, {}, tmp_path / "ok", ok, **kw)
    assert read_summary(tmp_path / "ok" / "summary.parquet")["x_metric"] == 0.9 and row["error"] is None


def test_a_failed_run_group_records_each_run_failed_where_it_failed(tmp_path):
    """``execute_many`` (a fused pack): one exception is every unfinished run's recorded error, with the frames
    where it was raised; a run whose records are kept is restored, not failed."""
    from adaptlab.records import read_summary
    from adaptlab.runner import execute, execute_many

    def identity(name):
        return {"run_id": f"x/{name}", "kind": "x", "study": "x", "grid": None, "backbone": None, "dataset": None,
                "seed": 0, "lr": None, "optimizer": None, "trainable": None}

    def ok(run):
        run.status = "ok"

    kept = execute(identity("kept"), {"n": 0}, tmp_path / "kept", ok, steps_planned=3, device="cpu")

    def fused_body(runs):
        assert [r.out_dir.name for r in runs] == ["a", "b"]  # the kept run is not trained again
        stacked_step_that_breaks()

    def stacked_step_that_breaks():
        raise ValueError("shapes differ")

    jobs = [{"identity": identity(n), "spec": {"n": i}, "out_dir": tmp_path / n, "steps_planned": 3}
            for i, n in enumerate(["kept", "a", "b"])]
    rows = execute_many(jobs, fused_body, device="cpu")
    assert rows[0]["status"] == "ok" and rows[0]["wall_seconds"] == kept["wall_seconds"]  # restored
    for name, row in zip(["a", "b"], rows[1:]):
        assert row["status"] == "failed" and "ValueError: shapes differ" in row["error"]
        assert "stacked_step_that_breaks" in row["error"]
        assert read_summary(tmp_path / name / "summary.parquet")["status"] == "failed"


def test_plasticity_runs_honour_on_error(tmp_path, tiny_data):
    """The analysis and the probe go through the skeleton too: a missing backbone is recorded, or raised."""
    from adaptlab.plasticity.run import run_analysis, run_linear_probe
    from conftest import TINY_MODEL

    spec = {"backbone": "base", "dataset": "tiny", "model": TINY_MODEL, "n_pairs": 8, "fc2_input": "padded",
            "radius": "max", "batch_size": 8, "linear_probe": {"max_iter": 10, "C": 1.0}}
    missing = tmp_path / "no_such.safetensors"
    row = run_analysis(spec, missing, tiny_data, tiny_data, tmp_path / "a", device="cpu")
    assert row["status"] == "failed" and "no_such.safetensors" in row["error"] and row["radius"] is None
    row = run_linear_probe(spec, missing, tiny_data, tmp_path / "p", device="cpu")
    assert row["status"] == "failed" and row["test_acc"] is None
    with pytest.raises(Exception, match="no_such"):
        run_analysis(spec, missing, tiny_data, tiny_data, tmp_path / "r", device="cpu", on_error="raise")


# --- a sixth study is six files ----------------------------------------------------------------------------------
FOO_SCHEMA = """x-study-order: 6
description: A made-up sixth study (tests/test_studies.py) that fits a line per seed.
type: object
additionalProperties: false
properties:
  seeds: {type: array, items: {type: integer, minimum: 0}, minItems: 1}
  steps: {type: integer, minimum: 1, default: 20}
required: [seeds]
"""
FOO_INIT = '''"""A made-up sixth study: a line fitted per seed."""
SECTION = "foo"
RUN_IDS = {"run": "foo/seed{seed}"}
SUMMARY_FIELDS = []
RAW_TABLES = {}
TABLES = {"foo_fits": "SELECT run_id, seed, final_loss FROM runs WHERE study = 'foo' ORDER BY seed"}
FIGURES = {}
CLAIMS = []


def check(cfg):
    pass


def specs(cfg):
    sec = cfg.get(SECTION)
    if not sec:
        return {}
    return {RUN_IDS["run"].format(seed=s): {"seed": s, "steps": sec["steps"]} for s in sec["seeds"]}
'''
FOO_RUN = '''"""One foo run: fit y = 3x by SGD through the shared loop."""
import torch

from adaptlab.config import config_hash, train_config
from adaptlab.runner import Run, execute
from adaptlab.train.loop import fit


class Line:
    selection_metric = "acc"

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 1, generator=g)
        self.y = 3 * self.x

    def train_batch(self, step, batch_size):
        return self.x, self.y

    def loss(self, model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    def evaluate(self, model, split, autocast=None):
        with torch.no_grad():
            mse = self.loss(model, (self.x, self.y)).item()
        return {"acc": -mse, "loss": mse}


def run_foo(spec, out_dir, threads=1):
    cfg = train_config({"steps": spec["steps"], "batch_size": 64, "lr": 0.1, "eval_every": spec["steps"],
                        "ckpt_every": 0, "warmup_steps": 0})
    identity = {"run_id": f"foo/seed{spec['seed']}", "kind": "run", "study": "foo", "grid": None,
                "backbone": None, "dataset": None, "seed": spec["seed"], "lr": cfg["lr"], "optimizer": cfg["optimizer"],
                "trainable": "full"}

    def body(run: Run) -> None:
        torch.manual_seed(spec["seed"])
        run.model = torch.nn.Linear(1, 1)
        run.result = fit(run.model, Line(spec["seed"]), cfg, run.out_dir, device=run.device,
                         config_id=config_hash(spec))

    return execute(identity, spec, out_dir, body, steps_planned=cfg["steps"], device="cpu", threads=threads)


RULES = {"foo_run": lambda spec, i, p, out, threads: run_foo(spec, out, threads)}
'''
FOO_SMK = '''rule foo_run:
    output:
        summary=study_run_dir("foo", "run") + "/summary.parquet",
    log:
        job_log("foo", "run"),
    params:
        spec=study_params("foo", "run"),
    script:
        "../workflow/scripts/study_run.py"


rule foo_runs:
    input:
        [summary_file(r) for r in STUDY_SPECS["foo"]],
'''


def test_a_sixth_study_is_six_files_and_runs(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    touched = {
        "src/adaptlab/schemas/foo.schema.yaml": FOO_SCHEMA,
        "src/adaptlab/foo/__init__.py": FOO_INIT,
        "src/adaptlab/foo/run.py": FOO_RUN,
        "rules/foo.smk": FOO_SMK,
        "configs/test.yaml": (work / "configs/test.yaml").read_text() + "\nfoo: {seeds: [0, 1], steps: 30}\n",
        "profiles/slurm/config.yaml": (work / "profiles/slurm/config.yaml").read_text().replace(
            "set-resources:\n", "set-resources:\n  foo_run: {slurm_partition: CHANGE_ME_CPU, runtime: 10, "
                                "mem_mb: 1000, cpus_per_task: 1}\n", 1),
    }
    assert len(touched) == 6
    for rel, text in touched.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(work / "src")}
    where = subprocess.run([sys.executable, "-c", "import adaptlab.studies as s; print(s.__file__, s.STUDIES)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(work / "src")) and "'continual', 'foo')" in where, where

    dry = snakemake(work, "-n", "--configfile", "configs/test.yaml", "--profile", "profiles/slurm", env=env)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert len(planned_jobs(dry.stdout + dry.stderr).get("foo_run", [])) == 2
    bad = subprocess.run([sys.executable, "-m", "adaptlab.cli", "validate", "configs/test.yaml"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 0, bad.stdout + bad.stderr
    (work / "configs/bad.yaml").write_text(touched["configs/test.yaml"].replace("seeds: [0, 1], steps: 30",
                                                                               "seeds: [-1]"))
    bad = subprocess.run([sys.executable, "-m", "adaptlab.cli", "validate", "configs/bad.yaml"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "foo.seeds[0]" in bad.stdout + bad.stderr, bad.stdout + bad.stderr

    run = snakemake(work, "foo_runs", "--cores", "2", "--configfile", "configs/test.yaml", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [read_summary(work / f"results/runs/foo/seed{s}/summary.parquet") for s in (0, 1)]
    assert all(r["status"] == "ok" and r["study"] == "foo" and r["final_loss"] < 0.1 for r in rows), rows  # from ~9
    assert (work / "results/runs/foo/seed0/job.log").is_file()
