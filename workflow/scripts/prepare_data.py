"""Prepare one dataset of the config (rule prepare_data)."""
import json

from adaptlab.data import prepare_dataset
from adaptlab.joblog import job_log

with job_log(snakemake.log[0]):
    prepare_dataset(snakemake.wildcards.dataset, json.loads(snakemake.params.spec), snakemake.output[0])
