"""Backbones assembled from timm."""
from adaptlab.models.vit import count_parameters, create_vit, load_model_weights, load_pretrained_weights, save_model_weights

__all__ = ["count_parameters", "create_vit", "load_model_weights", "load_pretrained_weights", "save_model_weights"]
