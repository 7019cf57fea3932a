"""Streaming datasets: decoded on access, same batches as when held in memory."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cm import data
from cm.data import image_folder, streaming
from cm.runtime.views import DataConfig


def _folder(root, n=10):
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = "a" if i % 2 else "b"
        os.makedirs(root / cls, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            root / cls / f"{i:02d}.png")
    (root / "a" / "zz_header_broken.png").write_bytes(b"garbage")


def test_lazy_images_index_like_numpy():
    base = np.arange(6 * 2 * 2 * 1, dtype=np.uint8).reshape(6, 2, 2, 1)
    lazy = streaming.LazyImages(6, (2, 2, 1), lambda idx: base[idx])
    assert lazy.shape == base.shape and len(lazy) == 6 and lazy.dtype == np.uint8
    for key in (3, -1, slice(1, 5), slice(None, None, 2), np.array([5, 0, 5]),
                np.array([True, False] * 3)):
        np.testing.assert_array_equal(lazy[key], base[key])
    with pytest.raises(IndexError):
        lazy[np.array([6])]


def test_streamed_folder_equals_loaded_folder_and_batches(tmp_path):
    _folder(tmp_path)
    eager, labels = image_folder.load_folder(str(tmp_path), 16, 3, stream="never")
    lazy, lazy_labels = image_folder.load_folder(str(tmp_path), 16, 3, stream="always")
    assert isinstance(lazy, streaming.LazyImages) and len(lazy) == len(eager) == 10
    np.testing.assert_array_equal(lazy_labels, labels)
    np.testing.assert_array_equal(lazy[:], eager)
    a = data.Batcher(eager, 4, seed=1, labels=labels)
    b = data.Batcher(lazy, 4, seed=1, labels=lazy_labels)
    for step in (0, 3, 7):
        for k, v in a.batch(step).items():
            np.testing.assert_array_equal(b.batch(step)[k], v)


def test_streamed_file_that_breaks_later_is_replaced_not_fatal(tmp_path):
    _folder(tmp_path, n=4)
    lazy, _ = image_folder.load_folder(str(tmp_path), 16, 3, stream="always")
    first = sorted(p for p in tmp_path.rglob("*.png") if "broken" not in p.name)[0]
    first.write_bytes(first.read_bytes()[:40])  # truncated after the header check
    out = lazy[np.arange(4)]
    assert out.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(out[0], out[1])  # replaced by the next readable file


def test_auto_streams_only_when_too_large(tmp_path):
    _folder(tmp_path, n=4)
    images, _ = image_folder.load_folder(str(tmp_path), 16, 3, stream="auto")
    assert isinstance(images, np.ndarray)
    images, _ = image_folder.load_folder(str(tmp_path), 16, 3, stream="auto",
                                         max_memory_gb=1e-6)
    assert isinstance(images, streaming.LazyImages)
    with pytest.raises(data.DatasetError, match="data.stream"):
        data.load_dataset(DataConfig(name="folder", path=str(tmp_path), stream="maybe"))


def test_streamed_tfds_equals_loaded_tfds():
    cfg = dict(name="tfds:celeb_a", image_size=16, crop=140, num_channels=3)
    with tfds.testing.mock_data(num_examples=5):
        eager, _ = data.load_dataset(DataConfig(**cfg, stream="never"))
        lazy, _ = data.load_dataset(DataConfig(**cfg, stream="always"))
        assert isinstance(lazy, streaming.LazyImages)
        np.testing.assert_array_equal(lazy[np.array([4, 0, 2])], eager[[4, 0, 2]])


def test_streamed_tfds_keeps_its_labels():
    cfg = dict(name="tfds:cifar10", image_size=8, num_channels=3)
    with tfds.testing.mock_data(num_examples=6):
        eager, labels = data.load_dataset(DataConfig(**cfg, stream="never"))
        lazy, lazy_labels = data.load_dataset(DataConfig(**cfg, stream="always"))
        idx = np.array([5, 1, 3])
        np.testing.assert_array_equal(lazy_labels[idx], labels[idx])
        a = data.Batcher(eager, 4, seed=0, labels=labels).batch(1)
        b = data.Batcher(lazy, 4, seed=0, labels=lazy_labels).batch(1)
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["x"], b["x"])
