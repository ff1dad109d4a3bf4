"""Prepare one instance-segmentation dataset of the peft section (rule peft_seg_data)."""
import json

from adaptlab.peft.segmentation import build_seg_dataset, save_seg_dataset

save_seg_dataset(build_seg_dataset(snakemake.wildcards.segdata, json.loads(snakemake.params.spec)), snakemake.output[0])
