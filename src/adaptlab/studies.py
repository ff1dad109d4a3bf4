"""The registry of studies: what each one adds to the DAG's records, tables and figures.

A study is a module listed in ``STUDY_MODULES``. It may define any of:

- ``run_ids(cfg) -> list[str]``: the runs it expects for a validated config (none when its section is
  absent). Every run writes ``results/runs/<run_id>/summary.parquet`` (``adaptlab.records`` schema plus the
  study's ``SUMMARY_FIELDS``) and may write ``steps.parquet`` and one ``<name>.parquet`` per ``RAW_TABLES``
  entry next to it.
- ``SUMMARY_FIELDS: list[pyarrow.Field]``: the study's extra summary columns.
- ``RAW_TABLES: dict[str, pyarrow.Schema]``: per-run Parquet files loaded into the DuckDB table of that name
  (empty, with that schema, when no run wrote one, so the study's SQL always runs).
- ``TABLES: dict[str, str | callable(con, name)]`` (SQL over ``runs``, ``steps``, raw tables and earlier tables,
  or a function that creates the table, for statistics SQL lacks) and
  ``FIGURES: dict[str, callable(con, path)]``.

The aggregation, the Snakefile and the CLI all read this one list, so they agree on what a run is.
"""
from __future__ import annotations

import importlib
from collections import Counter
from types import ModuleType

STUDY_MODULES: tuple[str, ...] = (
    "adaptlab.plasticity",
    "adaptlab.precond",
    "adaptlab.peft.study",
    "adaptlab.icl.study",
    "adaptlab.continual",
)


def studies() -> list[ModuleType]:
    return [importlib.import_module(name) for name in STUDY_MODULES]


def expected_run_ids(cfg: dict) -> list[str]:
    """Every run the config asks for: the pretraining of each backbone, the finetuning grids, each study's runs."""
    from adaptlab.config import backbone_names, expand_runs, pretrain_run_id

    ids = [pretrain_run_id(b) for b in backbone_names(cfg)]
    ids += [r.run_id for r in expand_runs(cfg)]
    for study in studies():
        if hasattr(study, "run_ids"):
            ids += list(study.run_ids(cfg))
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ValueError(f"run ids claimed twice: {dupes[:5]}")
    return ids
