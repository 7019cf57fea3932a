"""Images and labels for training and evaluation, and the batches where noise is born.

Layers, bottom up: `sources` (readers and `DatasetError`), `streaming` and
`image_folder` (datasets decoded on access), `dataset` (the loader per `data.name`),
`batcher` (deterministic, resumable batches with their Gaussian noise), and `prefetch`
(a generic background thread that prepares batches ahead of the step).
"""

from cm.data.batcher import NOISE_BLOCK, Batcher
from cm.data.dataset import LOADERS, load_dataset, load_images
from cm.data.prefetch import Prefetcher, PrefetchError, PrefetchStats
from cm.data.sources import (
    DatasetError,
    center_crop,
    load_digits,
    load_digits_labels,
    load_npz_with_labels,
)

__all__ = [
    "NOISE_BLOCK", "Batcher", "LOADERS", "load_dataset", "load_images", "Prefetcher",
    "PrefetchError", "PrefetchStats",
    "DatasetError", "center_crop", "load_digits", "load_digits_labels", "load_npz_with_labels",
]
