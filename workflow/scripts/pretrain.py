"""Pretrain the backbone, or load local timm weights (rule pretrain)."""
from adaptlab.jobstart import start_job

start_job()  # torch and timm imported with the cyclic GC off (0.7 s of a job's start)

import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.runner import run_pretrain

with job_log(snakemake.log[0]):
    run_pretrain(json.loads(snakemake.params.spec), (snakemake.input.data or [None])[0],
                 Path(snakemake.output.model).parent, device=snakemake.params.device, threads=snakemake.threads)
