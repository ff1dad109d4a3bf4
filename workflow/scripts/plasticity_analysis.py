"""Plasticity of every component of every layer for one (backbone, dataset) (rule plasticity_analysis)."""
import json
from pathlib import Path

from adaptlab.plasticity.runner import run_analysis

i = snakemake.input
run_analysis(json.loads(snakemake.params.spec), i.model, i.source, i.target, Path(snakemake.output.summary).parent,
             device=snakemake.params.device, threads=snakemake.threads)
