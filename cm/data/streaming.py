"""Datasets too large for host memory: an array-like that decodes images on access.

`LazyImages` behaves like a read-only uint8 array `[N, S, S, C]` for what the rest of
the code does with datasets (`len`, `.shape`, `.dtype`, indexing with an int, a slice
or an index array), so `cm.data.Batcher` keeps its deterministic, resumable batches;
decoding happens in the input pipeline's background thread.
"""

from collections.abc import Callable

import numpy as np
from absl import logging
from PIL import Image

from cm.data import pixels

# read(indices [k]) -> uint8 [k, S, S, C]
ReadFn = Callable[[np.ndarray], np.ndarray]


class LazyImages:
    """A read-only image array decoded on access."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, n: int, image_shape: tuple[int, int, int], read: ReadFn):
        self._n = n
        self._image_shape = tuple(image_shape)
        self._read = read

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n,) + self._image_shape

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            idx = np.arange(self._n)[key]
        elif isinstance(key, int | np.integer):
            return self[np.asarray([key])][0]
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
        if idx.size and (idx.min() < -self._n or idx.max() >= self._n):
            raise IndexError(f"index out of range for {self._n} images")
        idx = np.where(idx < 0, idx + self._n, idx)
        out = self._read(idx.astype(np.int64))
        assert out.shape == (len(idx),) + self._image_shape, out.shape
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def folder_images(files: list[str], image_size: int, num_channels: int,
                  prepare: Callable[[Image.Image], Image.Image]) -> LazyImages:
    """Image files decoded on access. A file that fails to decode (a truncated file
    found in the hundredth hour) is logged and replaced by the next readable one, so
    the run goes on and stays deterministic."""
    mode = "L" if num_channels == 1 else "RGB"

    def decode(path: str) -> np.ndarray | None:
        try:
            with Image.open(path) as im:
                arr = np.asarray(prepare(pixels.convert(im, mode)), np.uint8)
        except (OSError, ValueError) as e:
            logging.warning("skipping unreadable image %s: %s", path, e)
            return None
        return arr[..., None] if arr.ndim == 2 else arr

    def read(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), image_size, image_size, num_channels), np.uint8)
        for row, i in enumerate(idx):
            for attempt in range(len(files)):
                arr = decode(files[(int(i) + attempt) % len(files)])
                if arr is not None:
                    out[row] = arr
                    break
            else:
                raise OSError("no image file could be decoded")
        return out

    return LazyImages(len(files), (image_size, image_size, num_channels), read)


def source_images(source, image_shape: tuple[int, int, int],
                  transform: Callable[[np.ndarray], np.ndarray]) -> LazyImages:
    """A random-access TFDS data source, each read block cropped and resized."""

    def read(idx: np.ndarray) -> np.ndarray:
        items = [source[int(i)] for i in idx]
        block = np.stack([np.asarray(it["image"]) for it in items])
        if block.ndim == 3:
            block = block[..., None]
        return transform(block)

    return LazyImages(len(source), image_shape, read)


class LazyLabels:
    """Int labels `[N]` of a random-access source, read on access (index arrays only)."""

    dtype = np.dtype(np.int32)

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    @property
    def shape(self) -> tuple[int]:
        return (len(self._source),)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx))
        return np.asarray([int(self._source[int(i)]["label"]) for i in idx], np.int32)

    def min(self) -> int:  # bounds checks read every label once
        return int(self[np.arange(len(self))].min())

    def max(self) -> int:
        return int(self[np.arange(len(self))].max())


def too_large(n: int, image_shape: tuple[int, int, int], max_gb: float) -> bool:
    return n * int(np.prod(image_shape)) > max_gb * 2**30
