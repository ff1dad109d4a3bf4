"""One job of a study's rule: the rule's entry in ``adaptlab.<study>.run.RULES``, with this job's spec, inputs and
params, inside the job log (adaptlab.studies.run_job)."""
import json

from adaptlab.jobstart import start_job

# torch and timm (unless no run needs it) imported with the cyclic GC off (0.7 s of a job's start)
start_job([(snakemake.rule, json.loads(snakemake.params.spec))])

from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.studies import run_job

with job_log(snakemake.log[0]):
    run_job(snakemake.rule, json.loads(snakemake.params.spec), dict(snakemake.input.items()),
            dict(snakemake.params.items()), Path(snakemake.output.summary).parent, snakemake.threads)
