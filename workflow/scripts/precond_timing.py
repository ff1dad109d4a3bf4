"""Interleaved time per step of every attention arm of the precond study (rule precond_timing)."""
import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.precond.run import run_timing

with job_log(snakemake.log[0]):
    run_timing(json.loads(snakemake.params.spec), Path(snakemake.output.summary).parent, threads=snakemake.threads)
