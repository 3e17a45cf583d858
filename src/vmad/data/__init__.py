"""Data layer: one sample record, readers for every dataset layout, image and mask loading."""

from vmad.data.dataset import (
    DATA_FORMATS,
    AnomalyDataset,
    ClassCounts,
    DataOptions,
    data_options,
    detect_format,
    load_dataset,
)
from vmad.data.folder import FolderConfig
from vmad.data.formats import MagneticTileConfig, NeuSegConfig
from vmad.data.io import MASK_THRESHOLD, check_sample, image_shape, read_image, read_mask
from vmad.data.records import ANOMALOUS, NORMAL, Sample

__all__ = [
    "ANOMALOUS",
    "DATA_FORMATS",
    "MASK_THRESHOLD",
    "NORMAL",
    "AnomalyDataset",
    "ClassCounts",
    "DataOptions",
    "FolderConfig",
    "MagneticTileConfig",
    "NeuSegConfig",
    "Sample",
    "check_sample",
    "data_options",
    "detect_format",
    "image_shape",
    "load_dataset",
    "read_image",
    "read_mask",
]
