"""Linear-probing baseline of one (backbone, dataset) (rule linear_probe)."""
import json
from pathlib import Path

from adaptlab.plasticity.runner import run_linear_probe

run_linear_probe(json.loads(snakemake.params.spec), snakemake.input.model, snakemake.input.data,
                 Path(snakemake.output.summary).parent, device=snakemake.params.device, threads=snakemake.threads)
