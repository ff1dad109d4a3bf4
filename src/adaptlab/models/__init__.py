"""Backbones assembled from timm. The names load on first use: importing ``adaptlab.models.<module>`` must not
import timm (seconds per process) for a job whose models are not timm's."""
import importlib

__all__ = ["count_parameters", "create_vit", "load_model_weights", "load_pretrained_weights", "save_model_weights"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("adaptlab.models.vit"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
