"""The study contract, and the registry of studies that follow it.

A study is a config section with a schema fragment ``adaptlab/schemas/<section>.schema.yaml`` (the fragment
registers it: ``STUDIES`` is discovered from them) and a package ``adaptlab.<section>`` whose ``__init__`` is its surface (``Study`` below). Its run functions live
in ``adaptlab.<section>.run``, which maps each of its rules to one (``RULES``); its Snakemake rules in
``rules/<section>.smk`` (the Snakefile includes one per registered study) run ``workflow/scripts/study_run.py``,
which calls ``run_job`` below. The schema, the Snakefile, the aggregation
and the CLI all read this one registry; ``tests/test_studies.py`` checks that every registered study has its
schema fragment, rules file, test-preset section and SLURM resources.

The surface imports no torch, timm, scipy or matplotlib at module level: Snakemake imports it to parse the
workflow, once per ``snakemake`` call and once per cluster job.
"""
from __future__ import annotations

import importlib
import re
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Callable, Protocol, runtime_checkable

SCHEMAS = Path(__file__).parent / "schemas"


def _discover() -> tuple[str, ...]:
    """The registered studies: one per schema fragment ``schemas/<section>.schema.yaml``, ordered by the fragment's
    ``x-study-order`` (the papers' order; tables, figures and expected runs are listed in it), then by name. Adding
    a study's fragment registers it; nothing else lists the studies."""
    order = {}
    for frag in SCHEMAS.glob("*.schema.yaml"):
        head = re.search(r"^x-study-order:\s*(\d+)", frag.read_text(), flags=re.M)  # no YAML parse: it is paid per job
        order[frag.name.removesuffix(".schema.yaml")] = int(head.group(1)) if head else 10**6
    return tuple(sorted(order, key=lambda name: (order[name], name)))


# The registry, in the papers' order.
STUDIES: tuple[str, ...] = _discover()


@runtime_checkable
class Study(Protocol):
    """What every ``adaptlab.<section>`` package defines.

    - ``SECTION``: its config section (and package name).
    - ``RUN_IDS``: run kind -> run-id pattern, e.g. ``{"run": "continual/{cgrid}/{cbench}/.../seed{seed}"}``. The
      one owner of the id format: ``run_id`` formats it, and the rules use the same pattern as their wildcard
      path (``results/runs/<pattern>/summary.parquet``), so ids and paths cannot drift apart.
    - ``check(cfg)``: the cross-checks a schema cannot express; raises ``ConfigError`` naming the key.
      ``adaptlab.config.validate_config`` runs it whenever the section is present.
    - ``specs(cfg) -> {run_id: spec}``: every run the section asks for, each with everything that run uses (its
      Snakemake params, hence its rerun trigger). Empty when the section is absent.
    - ``SUMMARY_FIELDS``: the study's extra ``summary.parquet`` columns (``adaptlab.records`` holds the core).
    - ``RAW_TABLES``: per-run Parquet files (``<name>.parquet`` in the run directory) loaded into the DuckDB
      table of that name (empty, with that schema, when no run wrote one, so the study's SQL always runs).
    - ``TABLES``: name -> SQL over ``runs``, ``steps``, raw tables and earlier tables, or callable(con, name)
      that creates the table (for statistics SQL lacks). ``FIGURES``: name -> callable(con, path).
    - ``CLAIMS``: the paper's claims as data (``adaptlab.claims.Claim``, usually in ``<section>/claims.py``),
      checked over the results into the table ``paper_claims``.
    - optionally ``imports_timm(rule, spec)``: False when that run builds no timm model, so its job skips importing
      timm (``adaptlab.jobstart``); without it every job of the study imports timm.

    Its run module ``adaptlab.<section>.run`` maps rules to jobs (``RULES``) and, optionally, rules whose runs can
    train fused to ``(fuse_key(spec), job(specs, inputs, params, out_dirs, threads))`` (``FUSED``; adaptlab.packs).
    A rule file makes a rule packable with ``packable(rules.<rule>, ...)`` (rules/common.smk).
    """

    SECTION: str
    RUN_IDS: dict[str, str]
    SUMMARY_FIELDS: list
    RAW_TABLES: dict
    TABLES: dict[str, str | Callable]
    FIGURES: dict[str, Callable]
    CLAIMS: list

    def check(self, cfg: dict) -> None: ...

    def specs(self, cfg: dict) -> dict[str, dict]: ...


def study_sections() -> list[str]:
    return list(STUDIES)


def studies() -> list[ModuleType]:
    return [importlib.import_module(f"adaptlab.{section}") for section in study_sections()]


def study(section: str) -> ModuleType:
    if section not in study_sections():
        raise KeyError(f"no study {section!r} (registered: {study_sections()})")
    return importlib.import_module(f"adaptlab.{section}")


def run_id(study: ModuleType | Study, kind: str, **fields) -> str:
    """The run id of one run of ``study``: its ``RUN_IDS[kind]`` pattern filled with ``fields`` (extra fields, such
    as a rule's other wildcards, are ignored)."""
    return study.RUN_IDS[kind].format(**fields)


def expected_runs(cfg: dict, study_specs: dict[str, dict] | None = None) -> dict[str, str]:
    """Every run the config asks for, run id -> its study: the pretraining of each backbone ("pretrain"), the
    finetuning grids (their grid's study), each study's runs (``study_specs``: section -> ``specs(cfg)`` when the
    caller has them already). Raises ValueError when two of them claim the same id."""
    from adaptlab.config import backbone_names, expand_runs, pretrain_run_id

    pairs = [(pretrain_run_id(b), "pretrain") for b in backbone_names(cfg)]
    pairs += [(r.run_id, r.study) for r in expand_runs(cfg)]
    for s in studies():
        pairs += [(i, s.SECTION) for i in (study_specs[s.SECTION] if study_specs is not None else s.specs(cfg))]
    dupes = sorted(i for i, n in Counter(i for i, _ in pairs).items() if n > 1)
    if dupes:
        raise ValueError(f"run ids claimed twice: {dupes[:5]}")
    return dict(pairs)


def expected_run_ids(cfg: dict, study_specs: dict[str, dict] | None = None) -> list[str]:
    """The ids of ``expected_runs``, in order."""
    return list(expected_runs(cfg, study_specs))


def study_run_module(rule: str) -> ModuleType:
    """The run module (``adaptlab.<section>.run``) whose ``RULES`` has ``rule``."""
    # the study whose name the rule starts with first (every job would otherwise import every study's run module,
    # with its libraries), then the others in order
    for section in sorted(study_sections(), key=lambda sec: not rule.startswith(sec)):
        runs = importlib.import_module(f"adaptlab.{section}.run")
        if rule in getattr(runs, "RULES", {}):
            return runs
    raise KeyError(f"rule {rule!r}: no study's run.RULES has it (studies: {study_sections()})")


def run_job(rule: str, spec: dict, inputs: dict, params: dict, out_dir, threads: int) -> dict:
    """One Snakemake job of a study's rule: ``adaptlab.<section>.run.RULES[rule]`` (the study found by its rule
    name) called with the run's spec, the job's named inputs and params, its run directory and thread count."""
    return study_run_module(rule).RULES[rule](spec, inputs, params, out_dir, threads)


def imports_timm(rule: str, spec: dict | None) -> bool:
    """Whether a run of ``rule`` builds a timm model (``adaptlab.jobstart``): its study's optional
    ``imports_timm(rule, spec)`` (the study whose section the rule's name starts with, as ``study_run_module``
    looks first), else yes; a core rule's run, such as finetuning's, has no study spec (None)."""
    section = next((s for s in study_sections() if rule.startswith(s)), None)
    hook = getattr(study(section), "imports_timm", None) if section else None
    return True if hook is None else bool(hook(rule, spec))
