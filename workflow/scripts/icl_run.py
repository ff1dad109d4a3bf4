"""One run of the ICL study (rules icl_uni, icl_mm)."""
import json
from pathlib import Path

from adaptlab.icl.run import run_icl
from adaptlab.joblog import job_log

p = snakemake.params
init = list(getattr(snakemake.input, "init", []))
with job_log(snakemake.log[0]):
    run_icl(json.loads(p.spec), Path(snakemake.output.summary).parent, init_weights=init[0] if init else None,
            device=p.device, threads=snakemake.threads, on_error=p.on_error)
