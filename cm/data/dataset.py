"""The configured dataset: the loader per `data.name` (the `data` section's view is
`cm.runtime.views.DataConfig`).

Every dataset becomes uint8 images `[N, H, W, C]` (an array in host memory, or a
streamed array-like for folders and TFDS datasets too large for it) and int32 labels
`[N]` or None.
"""

from collections.abc import Callable

import numpy as np

from cm.data import cifar, idx, image_folder, streaming
from cm.data.sources import (
    DatasetError,
    center_crop,
    load_digits,
    load_digits_labels,
    load_npz_with_labels,
    load_tfds_with_labels,
    prepare,
)
from cm.runtime.views import DataConfig


def _load_folder(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    return image_folder.load_folder(cfg.path, cfg.image_size, cfg.num_channels, cfg.stream,
                                    cfg.max_memory_gb)


def load_digits_with_labels(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    return load_digits(cfg.image_size), load_digits_labels()


def _load_idx(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """IDX files (`idx`: `data.path`; `fashion_mnist`: `data.path` or the Debian folder),
    center-cropped, then padded 28 -> 32 with background (`idx.pads_to`) or resized."""
    if cfg.name == "idx" and not cfg.path:
        raise DatasetError("data.name=idx needs data.path: a folder of IDX files or one "
                           "images file (e.g. train-images-idx3-ubyte.gz)")
    path = idx.fashion_mnist_dir(cfg.path) if cfg.name == "fashion_mnist" else cfg.path
    images, labels = idx.load_split(path, cfg.split)
    images = center_crop(images, cfg.crop)
    if idx.pads_to(images.shape[1], cfg.image_size):
        return idx.pad(images, cfg.image_size), labels
    return prepare(images, 0, cfg.image_size), labels


# Each loader returns (uint8 images [N, H, W, C], int32 labels [N] or None).
LOADERS: dict[str, Callable[[DataConfig], tuple[np.ndarray, np.ndarray | None]]] = {
    # The official archive with NumPy (no TensorFlow), in TFDS's order; tfds:cifar10 reads a
    # prepared TFDS copy.
    "cifar10": lambda c: cifar.load_cifar10(c.data_dir, c.split, download=c.download),
    "digits": load_digits_with_labels,
    "npz": lambda c: load_npz_with_labels(c.path, c.value_range),
    "folder": lambda c: _load_folder(c),
    "fashion_mnist": _load_idx,
    "idx": _load_idx,
}


def _load_tfds_by_name(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    name = cfg.name.split(":", 1)[1]
    transform = lambda block: prepare(block, cfg.crop, cfg.image_size)  # noqa: E731
    if cfg.stream != "never":
        import tensorflow_datasets as tfds  # slow to import: only for TFDS sources

        shape = (cfg.image_size, cfg.image_size, cfg.num_channels)
        try:
            source = tfds.data_source(name, split=cfg.split, data_dir=cfg.data_dir or None,
                                      download=False)
        except Exception:
            source = None  # not prepared: load_tfds_with_labels explains
        if source is not None and (cfg.stream == "always" or streaming.too_large(
                len(source), shape, cfg.max_memory_gb)):
            # Labels are read on access too (each read decodes the whole example).
            labels = streaming.LazyLabels(source) if "label" in source[0] else None
            return streaming.source_images(source, shape, transform), labels
    return load_tfds_with_labels(name, cfg.split, cfg.data_dir, transform=transform)


def load_dataset(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads the configured dataset, checked against the configured shape.

    Returns:
      uint8 images `[N, S, S, C]` and int32 labels `[N]` (None if the dataset has none).
    """
    if cfg.stream not in ("auto", "never", "always"):
        raise DatasetError(f"data.stream must be auto, never or always, got {cfg.stream!r}")
    if cfg.name.startswith("tfds:"):
        images, labels = _load_tfds_by_name(cfg)
    elif cfg.name in LOADERS:
        images, labels = LOADERS[cfg.name](cfg)
    else:
        raise DatasetError(f"unknown data.name {cfg.name!r}; expected one of {sorted(LOADERS)} "
                           "or 'tfds:<name>' for any prepared TFDS image dataset")
    if images.shape[0] == 0:
        raise DatasetError(f"dataset {cfg.name!r} has no images")
    if images.shape[1] != cfg.image_size or images.shape[2] != cfg.image_size:
        images = prepare(images, cfg.crop, cfg.image_size)
    if images.shape[-1] != cfg.num_channels:
        raise DatasetError(f"dataset {cfg.name!r} has {images.shape[-1]} channels but "
                           f"data.num_channels={cfg.num_channels}")
    return images, labels


def load_images(cfg: DataConfig) -> np.ndarray:
    """The images of `load_dataset`."""
    return load_dataset(cfg)[0]

