"""Prepare one dataset of the config (rule prepare_data)."""
import json

from adaptlab.data import prepare_dataset

prepare_dataset(snakemake.wildcards.dataset, json.loads(snakemake.params.spec), snakemake.output[0])
