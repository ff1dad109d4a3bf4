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
from adaptlab.claims import create_paper_claims
from adaptlab.run_state import RunState, quarantine, run_states
from adaptlab.studies import studies

FINETUNE_KEYS = "study, grid, backbone, dataset, trainable, optimizer"

# name -> SQL over the tables above it, or a callable(con, name) that creates the table (for scipy statistics).
TABLES: dict[str, str | Callable] = {
    # every expected run that is not ok, by name (states: adaptlab.run_state)
    "run_status": """
        SELECT s.run_id, s.study, s.state AS status, r.error, s.detail, r.steps_done, r.steps_planned
        FROM run_states s LEFT JOIN runs r USING (run_id)
        WHERE s.state <> 'ok'
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


def _paper_claims(con, name: str) -> None:
    create_paper_claims(con, name, {s.SECTION: list(getattr(s, "CLAIMS", [])) for s in studies()})


def all_tables() -> dict[str, str | Callable]:
    """The core tables, each study's, then ``paper_claims`` (each paper's claims checked over all of them)."""
    return {**_merged("TABLES", TABLES), "paper_claims": _paper_claims}


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
    try:
        if files:
            listing = ", ".join(_quote(f) for f in files)
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM _empty UNION ALL BY NAME "
                        f"SELECT * FROM read_parquet([{listing}], union_by_name = true)")
        else:
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM _empty")
    finally:
        con.unregister("_empty")


def _unreadable_by_duckdb(con, files: list[Path]) -> dict[Path, str]:
    """The files DuckDB cannot read on their own (after a failed bulk load), with its message."""
    bad = {}
    for f in files:
        try:
            con.execute(f"SELECT count(*) FROM read_parquet({_quote(f)})").fetchone()
        except duckdb.Error as err:
            bad[f] = str(err).splitlines()[0]
    return bad


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


def build_database(db_path: str | Path, states: list[RunState]) -> list[RunState]:
    """(Re)build the DuckDB file from the readable records of ``states`` (``adaptlab.run_state``); written to a
    temporary file and renamed. A file DuckDB still cannot read makes its run ``corrupt`` (left out, listed).
    Returns the states, with those."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_suffix(".duckdb.tmp")
    tmp.unlink(missing_ok=True)
    schemas = {"summary": ("runs", full_summary_schema()),
               "steps": ("steps", records.steps_schema(["val_acc", "val_loss"])),
               **{name: (name, schema) for name, schema in raw_tables().items()}}

    with duckdb.connect(str(tmp)) as con:
        for name, (table, schema) in schemas.items():
            files = [st.files[name] for st in states if name in st.files]
            try:
                _load_parquet(con, table, files, schema)
            except duckdb.Error:  # a file pyarrow read but DuckDB cannot: find it, mark its run, load the rest
                bad = _unreadable_by_duckdb(con, files)
                for st in states:
                    if st.files.get(name) in bad:
                        st.state, st.detail = "corrupt", f"{st.files[name]}: {bad[st.files[name]]}"
                _load_parquet(con, table, [f for f in files if f not in bad], schema)
        corrupt = {st.run_id for st in states if st.state == "corrupt"}
        if corrupt:  # a run with any corrupt file is left out of every table, not half-loaded
            ids = pa.table({"run_id": pa.array(sorted(corrupt), pa.string())})
            con.register("_corrupt", ids)
            for table, _ in schemas.values():
                con.execute(f"DELETE FROM {table} WHERE run_id IN (SELECT run_id FROM _corrupt)")
            con.unregister("_corrupt")
        state_table = pa.table({"run_id": [st.run_id for st in states], "study": [st.study for st in states],
                                "state": [st.state for st in states], "detail": [st.detail for st in states]},
                               schema=pa.schema([("run_id", pa.string()), ("study", pa.string()),
                                                 ("state", pa.string()), ("detail", pa.string())]))
        con.register("_states", state_table)
        con.execute("CREATE TABLE expected_runs AS SELECT run_id, study FROM _states")
        con.execute("CREATE TABLE run_states AS SELECT * FROM _states")
        con.unregister("_states")
        for name, sql in all_tables().items():
            if callable(sql):  # a table computed in Python (e.g. scipy tests) from the tables before it
                sql(con, name)
            else:
                con.execute(f"CREATE TABLE {name} AS {sql}")
    os.replace(tmp, db_path)
    return states


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


OVERVIEW_NAME = "report.rst"  # the opening page of `snakemake --report` (the Snakefile's `report:`)


def _csv_table(title: str, columns: list[str], rows: list[tuple]) -> str:
    def cell(v) -> str:
        text = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        return '"' + text.replace('"', '""').replace("\n", " ").replace("{", "(").replace("}", ")") + '"'

    head = ", ".join(cell(c) for c in columns)
    body = "\n".join("   " + ", ".join(cell(v) for v in row) for row in rows) or "   " + ", ".join(['""'] * len(columns))
    return f".. csv-table:: {title}\n   :header: {head}\n\n{body}\n"


def write_overview(db_path: str | Path, path: str | Path, max_listed: int = 50) -> None:
    """The report's opening page (reStructuredText): each paper's claims checked, the runs per study and state,
    and the first ``max_listed`` runs that are not ok (all of them are in ``run_status``)."""
    from adaptlab.run_state import STATES

    with duckdb.connect(str(db_path), read_only=True) as con:
        claims = con.execute("SELECT study, claim_id, claim, published, measured, n, verdict FROM paper_claims")
        claims_cols, claims_rows = [d[0] for d in claims.description], claims.fetchall()
        counts = con.execute(f"""SELECT study, {', '.join(f"count(*) FILTER (WHERE state = '{s}') AS {s}"
                                                           for s in STATES)}, count(*) AS runs
                                 FROM run_states GROUP BY study ORDER BY min(rowid)""")
        count_cols, count_rows = [d[0] for d in counts.description], counts.fetchall()
        listed = con.execute(f"SELECT run_id, status, coalesce(detail, error) FROM run_status LIMIT {max_listed}")
        listed_cols, listed_rows = ["run_id", "status", "detail"], [(r, s, (d or "").splitlines()[0] if d else None)
                                                                    for r, s, d in listed.fetchall()]
        n_not_ok = con.execute("SELECT count(*) FROM run_status").fetchone()[0]
    text = ["adaptlab results", "================", "",
            "Each paper's claims, checked over these results (table ``paper_claims``; the SQL of each claim is in "
            "its study's ``claims.py``):", "", _csv_table("Paper claims", claims_cols, claims_rows), "",
            "Runs per study and state (``adaptlab status``):", "", _csv_table("Run states", count_cols, count_rows),
            "", f"Runs that are not ok: {n_not_ok} (table ``run_status``)", ""]
    if listed_rows:
        text += [_csv_table("run_status", listed_cols, listed_rows), ""]
    Path(path).write_text("\n".join(text))


def aggregate(results_dir: str | Path, expected: dict[str, str] | list[str]) -> list[tuple]:
    """Build the database from whatever run records exist under ``results_dir``; return the runs that are not
    ok as (run_id, state, error or detail).

    ``expected``: run id -> study (``adaptlab.studies.expected_runs``), or run ids (a run's study is then read
    from its summary). Every run keeps its records in ``results/runs/<run_id>/``. Absent runs are
    ``missing`` (this works on a partial grid, e.g. ``adaptlab aggregate`` while a cluster run is going). A run
    with a corrupt record file is left out of every table, listed as ``corrupt`` with the file and the reader's
    message, and its records are moved to ``<run dir>/corrupt/`` so that the next ``snakemake`` reruns it.
    """
    results_dir = Path(results_dir)
    db = results_dir / "adaptlab.duckdb"
    states = build_database(db, run_states(results_dir, expected))
    moved = {st.run_id: f"{st.detail} (records moved to {quarantine(results_dir / 'runs' / st.run_id)}/; "
                        "the next snakemake reruns the run)" for st in states if st.state == "corrupt"}
    with duckdb.connect(str(db)) as con:
        for run_id, detail in moved.items():
            for table in ("run_states", "run_status"):
                con.execute(f"UPDATE {table} SET detail = ? WHERE run_id = ?", [detail, run_id])
        not_ok = con.execute("SELECT run_id, status, coalesce(detail, error) FROM run_status").fetchall()
    export(db, results_dir / "tables", results_dir / "figures")
    write_overview(db, results_dir / OVERVIEW_NAME)
    return not_ok
