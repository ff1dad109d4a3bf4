# adaptlab: data → pretraining → finetuning grids → run records (Parquet) → DuckDB tables and figures.
#
#   snakemake --cores all                                    # the embedded default (config.yaml)
#   snakemake --cores all --configfile configs/test.yaml     # a preset replaces config.yaml entirely
#   snakemake --profile profiles/slurm --configfile configs/paper.yaml
import os

from snakemake.utils import min_version

from adaptlab.studies import study_sections

min_version("9.0")

# A preset is a complete config: config.yaml is only read when no --configfile is given, so keys of the
# default never leak into a preset through Snakemake's recursive config merge.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"

include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/finetune.smk"

# one rules file per registered study (adaptlab.studies), in the registry's order
for section in study_sections():

    include: f"rules/{section}.smk"

include: "rules/packs.smk"
include: "rules/aggregate.smk"

# `snakemake --report` opens with the paper claims and the run states that the aggregation wrote
if os.path.exists(f"{RESULTS}/{OVERVIEW_NAME}"):

    report: os.path.abspath(f"{RESULTS}/{OVERVIEW_NAME}")

rule all:
    default_target: True
    input:
        rules.aggregate.output,
