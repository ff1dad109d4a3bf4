"""Plasticity of every component of every layer for one (backbone, dataset) (rule plasticity_analysis)."""
import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.plasticity.run import run_analysis

i, p = snakemake.input, snakemake.params
with job_log(snakemake.log[0]):
    run_analysis(json.loads(p.spec), i.model, i.source, i.target, Path(snakemake.output.summary).parent,
                 device=p.device, threads=snakemake.threads, on_error=p.on_error)
