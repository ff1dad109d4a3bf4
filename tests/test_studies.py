"""The study contract: every registered study follows it, and the registry agrees with the files around it."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from adaptlab.config import ConfigError, load_config, validate_config
from adaptlab.studies import STUDIES, Study, run_id, studies
from conftest import REPO, copy_workflow

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
