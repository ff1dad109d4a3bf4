"""The ``adaptlab`` command: query results with SQL, validate a config, list or aggregate runs.

    adaptlab sql "SELECT dataset, trainable, test_acc_mean FROM finetune_best"
    adaptlab sql --csv "SELECT * FROM runs" > runs.csv
    adaptlab validate configs/paper.yaml
    adaptlab runs --configfile configs/paper.yaml
    adaptlab aggregate            # rebuild the database from whatever runs exist (lists missing ones)
    adaptlab status               # runs per study and state (ok/stale/failed/diverged/missing/corrupt/running)
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

DEFAULT_DB = "results/adaptlab.duckdb"


def _sql(args) -> int:
    import duckdb

    from adaptlab.aggregate import format_markdown

    if not Path(args.db).is_file():
        print(f"adaptlab sql: database not found: {args.db} (run `snakemake --cores all` first)", file=sys.stderr)
        return 2
    with duckdb.connect(args.db, read_only=True) as con:
        try:
            cur = con.execute(args.query)
        except duckdb.Error as err:
            print(f"adaptlab sql: {err}", file=sys.stderr)
            return 1
        if cur.description is None:
            return 0
        columns = [d[0] for d in cur.description]
        rows = cur.fetchall()
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        sys.stdout.write(format_markdown(columns, rows))
        print(f"({len(rows)} rows)")
    return 0


def _load(path: str):
    from adaptlab.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


def _run_ids(path: str) -> tuple[dict, list[str]] | None:
    """A config and its run ids, after the schema and every study's own checks; None (message printed) if bad."""
    from adaptlab.studies import expected_run_ids

    cfg = _load(path)  # validate_config: the schema and every study's check
    if cfg is None:
        return None
    try:
        return cfg, expected_run_ids(cfg)
    except ValueError as err:  # two sections claiming the same run id
        print(f"{path}: invalid configuration\n  {err}", file=sys.stderr)
        return None


def _validate(args) -> int:
    from adaptlab.config import expand_runs

    checked = _run_ids(args.configfile)
    if checked is None:
        return 1
    cfg, ids = checked
    print(f"{args.configfile}: valid, {len(ids)} runs ({len(expand_runs(cfg))} in finetuning grids)")
    return 0


def _runs(args) -> int:
    checked = _run_ids(args.configfile)
    if checked is None:
        return 1
    _, ids = checked
    for run_id in ids:
        print(run_id)
    return 0


def _aggregate(args) -> int:
    from adaptlab.aggregate import aggregate
    from adaptlab.studies import expected_runs

    cfg = _load(args.configfile)
    if cfg is None:
        return 1
    bad = aggregate(args.results, expected_runs(cfg))
    for run_id, status, detail in bad:
        print(f"{status:9s} {run_id}" + (f"  {detail.splitlines()[0]}" if detail and status != "failed" else ""))
    print(f"{len(bad)} run(s) not ok; database: {Path(args.results) / 'adaptlab.duckdb'}")
    return 0


def _status(args) -> int:
    """Counts per study and state, read from the run directories (nothing is rebuilt or moved)."""
    from adaptlab.aggregate import format_markdown
    from adaptlab.run_state import STATES, counts, run_states
    from adaptlab.studies import expected_runs

    cfg = _load(args.configfile)
    if cfg is None:
        return 1
    states = run_states(args.results, expected_runs(cfg))
    table = counts(states)
    rows = [(study, *(c[s] for s in STATES), sum(c.values())) for study, c in table.items()]
    rows.append(("total", *(sum(c[s] for c in table.values()) for s in STATES), len(states)))
    sys.stdout.write(format_markdown(["study", *STATES, "runs"], rows))
    if args.list:
        for st in states:
            if st.state != "ok":
                print(f"{st.state:9s} {st.run_id}" + (f"  {st.detail}" if st.detail else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sql", help="run a SQL query on the results database and print a table")
    p.add_argument("query")
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--csv", action="store_true", help="print CSV instead of a Markdown table")
    p.set_defaults(func=_sql)
    for name, func, help_ in (("validate", _validate, "validate a config file against the schema"),
                              ("runs", _runs, "list every run id a config expands to")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("configfile", nargs="?", default="config.yaml")
        p.set_defaults(func=func)
    p = sub.add_parser("aggregate", help="rebuild the database and tables from the runs that exist")
    p.add_argument("--configfile", default="config.yaml")
    p.add_argument("--results", default="results")
    p.set_defaults(func=_aggregate)
    p = sub.add_parser("status", help="count runs per study and state, from the run directories")
    p.add_argument("--configfile", default="config.yaml")
    p.add_argument("--results", default="results")
    p.add_argument("--list", action="store_true", help="also list every run that is not ok, with its detail")
    p.set_defaults(func=_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
