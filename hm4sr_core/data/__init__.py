"""Data layer: readers -> RawDataset -> preprocess -> Dataset -> splits -> batches."""

from .schema import DataError, Dataset, ModalityFeatures, RawDataset, RawModality

__all__ = ["DataError", "Dataset", "ModalityFeatures", "RawDataset", "RawModality"]
