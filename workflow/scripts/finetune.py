"""One finetuning run of a grid (rule finetune)."""
from adaptlab.jobstart import start_job

start_job()  # torch and timm imported with the cyclic GC off (0.7 s of a job's start)

import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.runner import run_finetune

p = snakemake.params
run = json.loads(p.run)
with job_log(snakemake.log[0]):
    run_finetune(run, run["model"], snakemake.input.model, snakemake.input.data, Path(snakemake.output.summary).parent,
                 device=p.device, threads=snakemake.threads, on_error=p.on_error)
