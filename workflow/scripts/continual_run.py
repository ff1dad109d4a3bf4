"""One continual-learning run (rule continual_run)."""
import json
from pathlib import Path

from adaptlab.continual.run import run_continual
from adaptlab.joblog import job_log

with job_log(snakemake.log[0]):
    run_continual(json.loads(snakemake.params.spec), Path(snakemake.output.summary).parent,
                  threads=snakemake.threads, on_error=snakemake.params.on_error,
                  data_path=snakemake.input.get("data"))
