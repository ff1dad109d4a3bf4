"""One finetuning run of a grid (rule finetune)."""
import json
from pathlib import Path

from adaptlab.runner import run_finetune

p = snakemake.params
run_finetune(json.loads(p.run), json.loads(p.model), snakemake.input.model, snakemake.input.data,
             Path(snakemake.output.summary).parent, device=p.device, threads=snakemake.threads, on_error=p.on_error)
