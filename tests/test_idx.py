"""Tests of the IDX reader (cm/idx.py) and `data.name=fashion_mnist|idx`.

Small IDX files are written here with `struct` (independently of the reader); the real
Fashion-MNIST files are read when the Debian package is installed.
"""

import gzip
import os
import struct

import numpy as np
import pytest

from cm import data
from cm.data import idx
from cm.runtime.views import DataConfig


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: two zero bytes, the type code, ndim, the dims (big-endian uint32)."""
    be = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    head = struct.pack(">HBB", 0, code, array.ndim)
    head += struct.pack(f">{array.ndim}I", *array.shape)
    return head + np.asarray(array, be).tobytes()


def _write(path, payload: bytes, gz: bool = True) -> str:
    path = str(path)
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(payload)
    return path


def _dataset(folder, n=5, h=28, w=28, prefix="", splits=(("train", 0), ("t10k", 1)),
             gz=True):
    """A fake MNIST-style folder; returns {split tag: (images [n,h,w], labels [n])}."""
    os.makedirs(folder, exist_ok=True)
    out = {}
    ext = ".gz" if gz else ""
    for tag, seed in splits:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write(os.path.join(folder, f"{prefix}{tag}-images-idx3-ubyte{ext}"),
               _idx_bytes(images), gz)
        _write(os.path.join(folder, f"{prefix}{tag}-labels-idx1-ubyte{ext}"),
               _idx_bytes(labels), gz)
        out[tag] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_reads_images_and_labels_of_each_split(tmp_path, gz):
    want = _dataset(tmp_path, gz=gz)
    for split, tag in (("train", "train"), ("test", "t10k")):
        images, labels = idx.load_split(str(tmp_path), split)
        assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(images[..., 0], want[tag][0])
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, want[tag][1])


def test_multibyte_types_are_big_endian(tmp_path):
    a = np.array([[1, 300], [-2, 32767]], np.int16)
    path = _write(tmp_path / "x.idx", _idx_bytes(a, 0x0B), gz=False)
    got = idx.read_idx(path)
    np.testing.assert_array_equal(got, a)
    f = np.array([0.5, -3.25], np.float32)
    np.testing.assert_array_equal(idx.read_idx(_write(tmp_path / "f.gz", _idx_bytes(f, 0x0D))),
                                  f)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_is_an_error_naming_it(tmp_path, gz):
    images = np.zeros((4, 28, 28), np.uint8)
    payload = _idx_bytes(images)
    if gz:  # a download cut short: the gzip stream itself ends early
        whole = gzip.compress(payload)
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(whole[: len(whole) // 2])
    else:  # one image byte missing
        path = tmp_path / "train-images-idx3-ubyte"
        path.write_bytes(payload[:-1])
    with pytest.raises(data.DatasetError, match="truncated") as e:
        idx.read_idx(str(path), idx.IMAGE_MAGIC)
    assert str(path) in str(e.value)


def test_trailing_bytes_and_short_header_are_errors(tmp_path):
    payload = _idx_bytes(np.zeros((2, 3, 3), np.uint8))
    path = _write(tmp_path / "a.gz", payload + b"\0")
    with pytest.raises(data.DatasetError, match="trailing bytes"):
        idx.read_idx(path)
    path = _write(tmp_path / "b.gz", payload[:10])  # magic + 1.5 of 3 dimensions
    with pytest.raises(data.DatasetError, match="truncated header"):
        idx.read_idx(path)


def test_wrong_magic_is_an_error_naming_the_file(tmp_path):
    labels = _write(tmp_path / "labels.gz", _idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(data.DatasetError, match="expected 0x00000803") as e:
        idx.read_idx(labels, idx.IMAGE_MAGIC)  # a labels file where images are expected
    assert labels in str(e.value)
    png = _write(tmp_path / "foreign.gz", b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(data.DatasetError, match="not an IDX file") as e:
        idx.read_idx(png)
    assert png in str(e.value)
    with pytest.raises(data.DatasetError, match="magic number 0x89504e47"):
        idx.read_idx(png, idx.IMAGE_MAGIC)


def test_images_and_labels_must_agree(tmp_path):
    _dataset(tmp_path, splits=(("train", 0),))
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(data.DatasetError, match="4 labels but .* 5 images"):
        idx.load_split(str(tmp_path), "train")


def test_emnist_names_one_file_and_ambiguous_folders(tmp_path):
    want = _dataset(tmp_path, prefix="emnist-letters-", splits=(("test", 3),))
    images, labels = idx.load_split(str(tmp_path), "test")
    np.testing.assert_array_equal(images[..., 0], want["test"][0])
    np.testing.assert_array_equal(labels, want["test"][1])
    _dataset(tmp_path, prefix="emnist-digits-", splits=(("test", 4),))
    with pytest.raises(data.DatasetError, match="several test image files"):
        idx.load_split(str(tmp_path), "test")
    one = str(tmp_path / "emnist-digits-test-images-idx3-ubyte.gz")  # data.path = a file
    images, labels = idx.load_split(one, "ignored")
    assert images.shape == (5, 28, 28, 1) and labels is not None
    os.remove(tmp_path / "emnist-digits-test-labels-idx1-ubyte.gz")
    assert idx.load_split(one)[1] is None  # no labels file: images only
    with pytest.raises(data.DatasetError, match="no train images"):
        idx.load_split(str(tmp_path), "train")
    with pytest.raises(data.DatasetError, match="splits"):
        idx.load_split(str(tmp_path), "validation")


def test_data_config_pads_to_32_and_resizes_other_sizes(tmp_path):
    want = _dataset(tmp_path)
    cfg = DataConfig(name="idx", path=str(tmp_path), split="train", image_size=32,
                          num_channels=1)
    images, labels = data.load_dataset(cfg)
    assert images.shape == (5, 32, 32, 1)
    np.testing.assert_array_equal(images[:, 2:30, 2:30, 0], want["train"][0])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (images[:, border] == 0).all()  # background
    np.testing.assert_array_equal(labels, want["train"][1])
    # Other sizes resize (bilinear): on a horizontal ramp 8 * col, an output column j
    # (centred on input column 2j + 0.5) is 8 * (2j + 0.5) away from the borders.
    ramp = np.broadcast_to(8 * np.arange(28, dtype=np.uint8), (3, 28, 28))
    os.makedirs(tmp_path / "ramp")
    _write(tmp_path / "ramp" / "t10k-images-idx3-ubyte.gz", _idx_bytes(ramp))
    small, labels = data.load_dataset(DataConfig(name="idx", path=str(tmp_path / "ramp"),
                                                      split="test", image_size=14,
                                                      num_channels=1))
    assert small.shape == (3, 14, 14, 1) and labels is None
    np.testing.assert_allclose(small[:, :, 1:-1, 0],
                               np.broadcast_to(8 * (2 * np.arange(1, 13) + 0.5), (3, 14, 12)),
                               atol=1.0)


def test_missing_dataset_says_how_to_install(tmp_path):
    cfg = DataConfig(name="fashion_mnist", path=str(tmp_path / "nowhere"),
                          image_size=28, num_channels=1)
    with pytest.raises(data.DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_dataset(cfg)
    with pytest.raises(data.DatasetError, match="data.name=idx needs data.path"):
        data.load_dataset(DataConfig(name="idx", image_size=28, num_channels=1))


_INSTALLED = os.path.isfile(os.path.join(idx.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not _INSTALLED,
                    reason=f"Fashion-MNIST not installed: {idx.FASHION_MNIST_INSTALL}")
def test_real_fashion_mnist_files():
    for split, n in (("train", 60_000), ("test", 10_000)):
        cfg = DataConfig(name="fashion_mnist", split=split, image_size=28,
                              num_channels=1)
        images, labels = data.load_dataset(cfg)
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        # Balanced classes (Xiao et al. 2017: 6,000 / 1,000 images per class).
        np.testing.assert_array_equal(np.bincount(labels), [n // 10] * 10)
        assert images.min() == 0 and images.max() == 255
    # The first labels of each split, as printed in Fashion-MNIST tutorials
    # (train[0] is an ankle boot, test[:3] ankle boot, pullover, trouser).
    _, train_labels = idx.load_split(idx.FASHION_MNIST_DIR, "train")
    _, test_labels = idx.load_split(idx.FASHION_MNIST_DIR, "test")
    np.testing.assert_array_equal(train_labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
    np.testing.assert_array_equal(test_labels[:10], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7])
    # Pixel statistics: the normalisation constants quoted for Fashion-MNIST (mean 0.2860,
    # std 0.3530 of the training pixels in [0, 1]).
    images, _ = idx.load_split(idx.FASHION_MNIST_DIR, "train")
    x = images.astype(np.float64) / 255.0
    assert abs(x.mean() - 0.2860) < 5e-5 and abs(x.std() - 0.3530) < 5e-5
    # Orientation: footwear points left with the sole at the bottom, so an ankle boot
    # (class 9, shaft on the right) has most of its ink in the right and bottom halves.
    boot = x[train_labels == 9].mean(axis=0)[..., 0]  # [28, 28]
    assert boot[:, 14:].sum() > 0.65 * boot.sum() and boot[14:].sum() > 0.6 * boot.sum()
