"""Aggregation: run records (Parquet) → ``results/adaptlab.duckdb`` → tables (CSV + Markdown) and figures.

The database holds the tables ``runs`` and ``steps`` (every run's records, materialised so the file is
self-contained), ``expected_runs`` (what the config asks for), each study's raw per-run tables, and one table
per entry of ``all_tables()``: the core ``TABLES`` below, then each study's (``adaptlab.studies``). Runs that
are missing, failed or diverged are listed by name in ``run_status``; none is dropped silently.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow as pa

from adaptlab import records
from adaptlab.studies import studies

FINETUNE_KEYS = "study, grid, backbone, dataset, trainable, optimizer"

# name -> SQL over the tables above it, or a callable(con, name) that creates the table (for scipy statistics).
TABLES: dict[str, str | Callable] = {
    "run_status": """
        SELECT e.run_id, coalesce(r.status, 'missing') AS status, r.error, r.steps_done, r.steps_planned
        FROM expected_runs e LEFT JOIN runs r USING (run_id)
        WHERE r.status IS NULL OR r.status <> 'ok'
        ORDER BY status, run_id""",
    "finetune_summary": f"""
        SELECT {FINETUNE_KEYS}, lr,
               count(*) AS n_runs, count(*) FILTER (WHERE status = 'ok') AS n_ok,
               avg(best_val_acc) FILTER (WHERE status = 'ok') AS val_acc_mean,
               avg(test_acc) FILTER (WHERE status = 'ok') AS test_acc_mean,
               stddev_samp(test_acc) FILTER (WHERE status = 'ok') AS test_acc_std,
               any_value(trainable_params) AS trainable_params,
               avg(steps_per_s) AS steps_per_s_mean
        FROM runs WHERE kind = 'finetune'
        GROUP BY ALL ORDER BY {FINETUNE_KEYS}, lr""",
    # lr chosen on validation accuracy (mean over seeds), never on test
    "finetune_best": f"""
        SELECT {FINETUNE_KEYS}, lr AS best_lr, n_ok AS n_seeds, val_acc_mean, test_acc_mean, test_acc_std,
               trainable_params
        FROM finetune_summary WHERE n_ok > 0
        QUALIFY row_number() OVER (PARTITION BY {FINETUNE_KEYS} ORDER BY val_acc_mean DESC, lr) = 1
        ORDER BY {FINETUNE_KEYS}""",
}


def plot_learning_curves(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Validation accuracy over steps per dataset, one curve per (trainable, optimizer) at its best lr."""
    rows = con.execute("""
        SELECT r.dataset, r.grid, r.trainable || ' / ' || r.optimizer || ' lr=' || r.lr AS arm, s.step,
               avg(s.val_acc) AS val_acc
        FROM steps s JOIN runs r USING (run_id)
        JOIN finetune_best b ON b.grid = r.grid AND b.dataset = r.dataset AND b.trainable = r.trainable
             AND b.optimizer = r.optimizer AND b.best_lr = r.lr
        WHERE s.val_acc IS NOT NULL AND r.status = 'ok'
        GROUP BY ALL ORDER BY 1, 2, 3, 4""").fetchall()
    panels = sorted({(r[0], r[1]) for r in rows})
    fig, axes = panel_axes(len(panels))
    for ax, (ds, grid) in zip(axes.flat, panels):
        arms = sorted({r[2] for r in rows if r[0] == ds and r[1] == grid})
        for arm in arms:
            pts = [(r[3], r[4]) for r in rows if r[0] == ds and r[1] == grid and r[2] == arm]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=arm)
        ax.set_title(f"{grid}: {ds}")
        ax.set_xlabel("step")
        ax.set_ylabel("val accuracy")
        ax.legend(fontsize=7)
    save_panels(fig, axes, len(panels), path, "no finished runs")


def panel_axes(n_panels: int, width: float = 4.5, height: float = 3.4):
    """A figure with one axis per panel, three to a row (at least one axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, n_panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def save_panels(fig, axes, n_panels: int, path: Path, empty_text: str) -> None:
    """Hide the unused axes (say ``empty_text`` when there is no panel at all), save as PNG, close."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[n_panels:]:
        ax.axis("off")
    if not n_panels:
        axes.flat[0].text(0.5, 0.5, empty_text, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES: dict[str, Callable[[duckdb.DuckDBPyConnection, Path], None]] = {
    "learning_curves": plot_learning_curves,
}


def _merged(attr: str, core: dict) -> dict:
    out = dict(core)
    for study in studies():
        for name, value in getattr(study, attr, {}).items():
            if name in out:
                raise ValueError(f"{study.__name__}.{attr}: {name!r} is already defined")
            out[name] = value
    return out


def all_tables() -> dict[str, str]:
    return _merged("TABLES", TABLES)


def all_figures() -> dict[str, Callable]:
    return _merged("FIGURES", FIGURES)


def raw_tables() -> dict[str, pa.Schema]:
    return _merged("RAW_TABLES", {})


def full_summary_schema() -> pa.Schema:
    extra = [f for study in studies() for f in getattr(study, "SUMMARY_FIELDS", [])]
    return records.summary_schema(extra)


def _quote(path: str | Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _load_parquet(con, table: str, files: list[Path], schema: pa.Schema) -> None:
    """Create ``table`` from ``files`` (union by column name) with at least the columns of ``schema``."""
    con.register("_empty", schema.empty_table())
    if files:
        listing = ", ".join(_quote(f) for f in files)
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM _empty UNION ALL BY NAME "
                    f"SELECT * FROM read_parquet([{listing}], union_by_name = true)")
    else:
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM _empty")
    con.unregister("_empty")


def format_markdown(columns: list[str], rows: list[tuple]) -> str:
    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def build_database(db_path: str | Path, run_dirs: list[Path], expected_run_ids: list[str]) -> None:
    """(Re)build the DuckDB file from the records in ``run_dirs``; written to a temporary file and renamed."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_suffix(".duckdb.tmp")
    tmp.unlink(missing_ok=True)

    def files(name: str) -> list[Path]:
        return [d / f"{name}.parquet" for d in run_dirs if (d / f"{name}.parquet").is_file()]

    with duckdb.connect(str(tmp)) as con:
        _load_parquet(con, "runs", files("summary"), full_summary_schema())
        _load_parquet(con, "steps", files("steps"), records.steps_schema(["val_acc", "val_loss"]))
        for name, schema in raw_tables().items():
            _load_parquet(con, name, files(name), schema)
        con.register("_expected", pa.table({"run_id": pa.array(expected_run_ids, pa.string())}))
        con.execute("CREATE TABLE expected_runs AS SELECT * FROM _expected")
        con.unregister("_expected")
        for name, sql in all_tables().items():
            if callable(sql):  # a table computed in Python (e.g. scipy tests) from the tables before it
                sql(con, name)
            else:
                con.execute(f"CREATE TABLE {name} AS {sql}")
    os.replace(tmp, db_path)


def export(db_path: str | Path, tables_dir: str | Path, figures_dir: str | Path) -> dict[str, int]:
    """Write every table of ``all_tables()`` as CSV and Markdown and every figure of ``all_figures()`` as PNG."""
    tables_dir, figures_dir = Path(tables_dir), Path(figures_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    with duckdb.connect(str(db_path), read_only=True) as con:
        for name in all_tables():
            cur = con.execute(f"SELECT * FROM {name}")
            columns = [d[0] for d in cur.description]
            rows = cur.fetchall()
            counts[name] = len(rows)
            con.execute(f"COPY {name} TO {_quote(tables_dir / (name + '.csv'))} (HEADER, DELIMITER ',')")
            (tables_dir / f"{name}.md").write_text(format_markdown(columns, rows))
        for name, plot in all_figures().items():
            plot(con, figures_dir / f"{name}.png")
    return counts


def aggregate(results_dir: str | Path, expected_run_ids: list[str]) -> list[tuple]:
    """Build the database from whatever run records exist under ``results_dir``; return the non-ok runs.

    Every run (pretraining, finetuning, each study's) keeps its records in ``results/runs/<run_id>/``.
    Expected runs whose files are absent are reported as ``missing`` (this works on a partial grid too, e.g.
    ``adaptlab aggregate`` while a cluster run is still going).
    """
    results_dir = Path(results_dir)
    run_dirs = [results_dir / "runs" / r for r in expected_run_ids]
    build_database(results_dir / "adaptlab.duckdb", run_dirs, list(expected_run_ids))
    export(results_dir / "adaptlab.duckdb", results_dir / "tables", results_dir / "figures")
    with duckdb.connect(str(results_dir / "adaptlab.duckdb"), read_only=True) as con:
        return con.execute("SELECT run_id, status, error FROM run_status").fetchall()
