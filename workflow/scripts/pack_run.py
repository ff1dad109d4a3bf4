"""A pack of runs of one rule (adaptlab.packs): each member trains as its own job would and writes its records, and
its job.log, in its own run directory."""
import json

from adaptlab.jobstart import start_job

# torch and timm (unless no run needs it) imported with the cyclic GC off (0.7 s of a job's start)
members = json.loads(snakemake.params.members)
start_job([(m["rule"], json.loads(m["params"]["spec"]) if "spec" in m["params"] else None) for m in members])

from adaptlab.packs import run_pack

run_pack(members, snakemake.threads, fuse=snakemake.params.fuse)
