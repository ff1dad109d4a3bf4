"""Build results/adaptlab.duckdb, the tables and the figures (rule aggregate)."""
from pathlib import Path

from adaptlab.aggregate import aggregate
from adaptlab.joblog import job_log

with job_log(snakemake.log[0]):
    not_ok = aggregate(Path(snakemake.output.db).parent, snakemake.params.expected)
    for run_id, status, detail in not_ok:
        print(f"[aggregate] {status}: {run_id}" + (f" ({detail.splitlines()[0]})" if detail else ""))
