"""Datasets: the procedural generator, real-data loaders and the prepared-dataset file."""
from adaptlab.data.prepare import build_dataset, prepare_dataset
from adaptlab.data.store import ImageDataset, load_dataset, save_dataset

__all__ = ["ImageDataset", "build_dataset", "load_dataset", "prepare_dataset", "save_dataset"]
