"""One run of the ICL study (rules icl_uni, icl_mm)."""
import json
from pathlib import Path

from adaptlab.icl.study import run_icl

spec = json.loads(snakemake.params.spec)
init = list(getattr(snakemake.input, "init", []))
run_icl(spec, Path(snakemake.output.summary).parent, init_weights=init[0] if init else None,
        device=snakemake.params.device, threads=snakemake.threads)
