"""Prepare one instance-segmentation dataset of the peft section (rule peft_seg_data)."""
import json

from adaptlab.joblog import job_log
from adaptlab.peft.seg_data import build_seg_dataset, save_seg_dataset

with job_log(snakemake.log[0]):
    save_seg_dataset(build_seg_dataset(snakemake.wildcards.segdata, json.loads(snakemake.params.spec)),
                     snakemake.output[0])
