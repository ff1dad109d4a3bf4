# Config validation, grid expansion and the input/param functions the rules share.
from snakemake.exceptions import WorkflowError

from adaptlab.aggregate import FIGURES, TABLES
from adaptlab.config import ConfigError, RESULTS, expand_runs, pretrain_spec, stable_json, validate_config

try:
    CFG = validate_config(config, source=", ".join(map(str, workflow.configfiles)) or "config")
except ConfigError as err:
    raise WorkflowError(str(err)) from None

RUNS = {r.run_id: r for r in expand_runs(CFG)}
NAME = r"[A-Za-z][A-Za-z0-9_-]*"


wildcard_constraints:
    dataset=NAME,
    grid=NAME,
    trainable=NAME,
    optimizer=NAME,
    lr=r"[0-9.eE+-]+",
    seed=r"\d+",


RUN_DIR = RESULTS + "/runs/{grid}/{dataset}/{trainable}/{optimizer}/lr{lr}/seed{seed}"


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
