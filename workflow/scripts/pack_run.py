"""A pack of runs of one rule (adaptlab.packs): each member trains as its own job would and writes its records, and
its job.log, in its own run directory."""
from adaptlab.jobstart import start_job

start_job()  # torch and timm imported with the cyclic GC off (0.7 s of a job's start)

import json

from adaptlab.packs import run_pack

run_pack(json.loads(snakemake.params.members), snakemake.threads, fuse=snakemake.params.fuse)
