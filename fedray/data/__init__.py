"""Data sets (registry of loaders) and client partitions (index arrays, cached)."""

from fedray.data.datasets import DATASETS, Dataset, load_dataset, needs_root, register
from fedray.data.partition import KINDS, cached_partition, label_histogram, partition

__all__ = [
    "DATASETS",
    "Dataset",
    "KINDS",
    "cached_partition",
    "label_histogram",
    "load_dataset",
    "needs_root",
    "partition",
    "register",
]
