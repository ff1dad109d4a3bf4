"""The shared training loop and what it is made of (optimizers, schedule, freezing, checkpoints, tasks)."""
from adaptlab.train.loop import FitResult, fit

__all__ = ["FitResult", "fit"]
