"""Images and labels for training and evaluation, and the batches where noise is born.

Layers, bottom up: `sources` (readers and `DatasetError`), `streaming` and
`image_folder` (datasets decoded on access), `dataset` (`DataConfig` and the loader per
`data.name`), `batcher` (deterministic, resumable batches with their Gaussian noise).
"""

from cm.data.batcher import NOISE_BLOCK, Batcher
from cm.data.dataset import LOADERS, DataConfig, load_dataset, load_images
from cm.data.sources import (
    DatasetError,
    center_crop,
    load_digits,
    load_digits_labels,
    load_npz_with_labels,
)

__all__ = [
    "NOISE_BLOCK", "Batcher", "LOADERS", "DataConfig", "load_dataset", "load_images",
    "DatasetError", "center_crop", "load_digits", "load_digits_labels", "load_npz_with_labels",
]
