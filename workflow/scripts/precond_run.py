"""One run of the precond study (rule precond_train)."""
import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.precond.run import run_precond

with job_log(snakemake.log[0]):
    run_precond(json.loads(snakemake.params.spec), snakemake.input.data, snakemake.input.get("model"),
                Path(snakemake.output.summary).parent, device=snakemake.params.device, threads=snakemake.threads)
