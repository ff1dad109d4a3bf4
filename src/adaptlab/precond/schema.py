"""Record schemas of the precond study (kept apart so that the study's surface imports no torch code)."""
import pyarrow as pa

CONDITION_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False), pa.field("step", pa.int64()), pa.field("layer", pa.int64()),
    pa.field("head", pa.int64()), pa.field("kappa_pre", pa.float64()), pa.field("kappa_post", pa.float64()),
])
LOSS_SCHEMA = pa.schema([pa.field("run_id", pa.string(), nullable=False), pa.field("step", pa.int64()),
                         pa.field("loss", pa.float64()), pa.field("loss_ema", pa.float64())])
TIMING_SCHEMA = pa.schema([pa.field("run_id", pa.string(), nullable=False), pa.field("arm", pa.string()),
                           pa.field("repeat", pa.int64()), pa.field("sec_per_step", pa.float64())])
SUMMARY_FIELDS = [
    pa.field("precond_phase", pa.string()),
    pa.field("precond_arm", pa.string()),
    pa.field("precond_is_baseline", pa.bool_()),
    pa.field("precond_loss_ema_q1", pa.float64()),  # EMA train loss after 25 % of the steps
    pa.field("precond_loss_ema_q2", pa.float64()),  # ... 50 %
    pa.field("precond_loss_ema_end", pa.float64()),  # ... at the last step
    pa.field("precond_threshold_factor", pa.float64()),
    pa.field("precond_sec_per_step", pa.float64()),  # median step interval of this run (probe/eval excluded)
]
