# Config validation, grid expansion and the input/param functions the rules share.
from snakemake.exceptions import WorkflowError

from adaptlab.aggregate import all_figures, all_tables
from adaptlab.config import ConfigError, RESULTS, expand_runs, pretrain_run_id, pretrain_spec, stable_json, validate_config
from adaptlab.studies import expected_run_ids

try:
    CFG = validate_config(config, source=", ".join(map(str, workflow.configfiles)) or "config")
    # Every run of every study: the aggregate rule waits for each one's summary.parquet.
    EXPECTED = expected_run_ids(CFG)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

RUNS = {r.run_id: r for r in expand_runs(CFG)}
NAME = r"[A-Za-z][A-Za-z0-9_-]*"


wildcard_constraints:
    dataset=NAME,
    grid=NAME,
    trainable=NAME,
    optimizer=NAME,
    backbone=NAME,
    lr=r"[0-9.eE+-]+",
    seed=r"\d+",


RUN_DIR = RESULTS + "/runs/{grid}/{dataset}/{trainable}/{optimizer}/lr{lr}/seed{seed}"
PRETRAIN_DIR = RESULTS + "/runs/" + pretrain_run_id("{backbone}")


def run_id(wc):
    return f"{wc.grid}/{wc.dataset}/{wc.trainable}/{wc.optimizer}/lr{wc.lr}/seed{wc.seed}"


def run_params(wc):
    """Every hyperparameter of one run, so that changing one grid value reruns exactly the runs it touches."""
    rid = run_id(wc)
    if rid not in RUNS:
        raise WorkflowError(f"{rid} is not a run of the configured grids")
    return stable_json(RUNS[rid].as_dict())


def dataset_file(name):
    return f"{RESULTS}/data/{name}.safetensors"


def backbone_file(name):
    """The pretrained weights of a backbone (the output of its pretrain job)."""
    return f"{RESULTS}/runs/{pretrain_run_id(name)}/model.safetensors"


def summary_file(run_id):
    return f"{RESULTS}/runs/{run_id}/summary.parquet"
