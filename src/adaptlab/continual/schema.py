"""Record schemas of the continual study (kept apart so that aggregation imports no torch code)."""
import pyarrow as pa

SUMMARY_FIELDS = [
    pa.field("method", pa.string()),
    pa.field("n_tasks", pa.int64()),  # tasks finished
    pa.field("summary_tasks", pa.int64()),  # K of acc_first / acc_last
    pa.field("acc_first", pa.float64()),  # mean final train accuracy over the first K tasks
    pa.field("acc_last", pa.float64()),  # ... over the last K tasks (null unless every task finished)
    pa.field("dead_frac_end", pa.float64()),  # dead-unit fraction (mean over hidden layers) after the last task
]

# Long format: one row per run × task × layer × metric; layer 'all' holds the model-level values.
RAW_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()), pa.field("grid", pa.string()), pa.field("benchmark", pa.string()),
    pa.field("model", pa.string()), pa.field("method", pa.string()), pa.field("seed", pa.int64()),
    pa.field("task", pa.int64()), pa.field("layer", pa.string()), pa.field("metric", pa.string()),
    pa.field("value", pa.float64()),
])
