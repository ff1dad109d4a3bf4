"""One run of the peft grid, or the source pretraining of a segmentation task (rules peft_run, peft_source)."""
import json
from pathlib import Path

from adaptlab.joblog import job_log
from adaptlab.peft.run import run_peft

inp, p = snakemake.input, snakemake.params
with job_log(snakemake.log[0]):
    run_peft(json.loads(p.spec), inp.backbone, inp.data, Path(snakemake.output.summary).parent,
             source_path=inp.get("source"), device=p.device, threads=snakemake.threads,
             on_error=p.get("on_error", "raise"))
