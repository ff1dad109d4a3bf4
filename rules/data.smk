# Data prep: each dataset of the config becomes one prepared file with seeded train/val/test splits.
# Raw-data paths are params (not inputs), so `snakemake -n` works on a machine without the datasets;
# a missing path fails here, naming the key and the path.


rule prepare_data:
    output:
        RESULTS + "/data/{dataset}.safetensors",
    log:
        RESULTS + "/logs/prepare_data/{dataset}.log",
    params:
        spec=lambda wc: stable_json(CFG["datasets"][wc.dataset]),
    threads: 1
    script:
        "../workflow/scripts/prepare_data.py"
