"""Linear-probing baseline of one (backbone, dataset) (rule linear_probe)."""
import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.plasticity.run import run_linear_probe

p = snakemake.params
with job_log(snakemake.log[0]):
    run_linear_probe(json.loads(p.spec), snakemake.input.model, snakemake.input.data,
                     Path(snakemake.output.summary).parent, device=p.device, threads=snakemake.threads,
                     on_error=p.on_error)
