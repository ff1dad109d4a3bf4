"""Pretrain the backbone, or load local timm weights (rule pretrain)."""
import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.runner import run_pretrain

with job_log(snakemake.log[0]):
    run_pretrain(json.loads(snakemake.params.spec), (snakemake.input.data or [None])[0],
                 Path(snakemake.output.model).parent, device=snakemake.params.device, threads=snakemake.threads)
