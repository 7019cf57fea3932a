"""cm.data.cifar: CIFAR-10 read from small tarballs in both official formats, TFDS's order,
checksums, damaged archives, the offline message and the atomic download."""

import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

from cm.data import cifar
from cm.data.sources import DatasetError

TRAIN_SIZES = (2, 3, 1, 2, 2)  # images per data_batch_1..5
TEST_SIZE = 4


def pixel(index: int, c: int, h: int, w: int) -> int:
    """The value of channel c, row h, column w of image `index` (train 0..9, test 100..);
    differs between h and w, so a transposed image does not match."""
    return (index * 37 + c * 83 + h * 5 + w) % 256


def label(index: int) -> int:
    return index * 3 % 10


def raw_image(index: int) -> bytes:
    """3072 bytes in the archive's order: all of red, then green, then blue, row by row."""
    return bytes(pixel(index, c, h, w) for c in range(3) for h in range(32) for w in range(32))


def expected(indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Images `[N, 32, 32, 3]` (`[n, h, w, c]` = pixel(index, c, h, w)) and labels."""
    n, h, w, c = np.meshgrid(np.array(indices), np.arange(32), np.arange(32), np.arange(3),
                             indexing="ij")
    return (n * 37 + c * 83 + h * 5 + w) % 256, np.array([label(i) for i in indices])


def batches() -> dict[str, list[int]]:
    starts = np.cumsum((0,) + TRAIN_SIZES)
    train = {f"data_batch_{b + 1}": list(range(starts[b], starts[b + 1])) for b in range(5)}
    return {**train, "test_batch": list(range(100, 100 + TEST_SIZE))}


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's str (BINSTRING), as the official batches are."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_py2_str


def python_batch(indices: list[int]) -> bytes:
    """A pickled batch as the official archive holds it: a dict of Python 2 strs, a list
    of labels and a numpy array (under Python 2's module name numpy.core.multiarray)."""
    data = np.frombuffer(b"".join(raw_image(i) for i in indices), np.uint8).reshape(-1, 3072)
    batch = {b"batch_label": b"a batch", b"labels": [label(i) for i in indices],
             b"data": data, b"filenames": [b"%d.png" % i for i in indices]}
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(batch)
    return out.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def binary_batch(indices: list[int]) -> bytes:
    return b"".join(bytes([label(i)]) + raw_image(i) for i in indices)


def write_archive(path, fmt: str = "python", skip: str = "", extra: bytes = b"") -> str:
    """A small CIFAR-10 tarball; `skip` leaves out a batch, `extra` lengthens batch 2."""
    folder = "cifar-10-batches-py" if fmt == "python" else "cifar-10-batches-bin"
    with tarfile.open(path, "w:gz") as tar:
        for name, indices in reversed(batches().items()):  # stored out of order
            if name == skip:
                continue
            data = python_batch(indices) if fmt == "python" else binary_batch(indices)
            data += extra if name == "data_batch_2" else b""
            info = tarfile.TarInfo(f"{folder}/{name}{'.bin' if fmt == 'binary' else ''}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def official(monkeypatch, path: str, name: str) -> None:
    """Makes the file at `path` the 'official' `name` (its size and sha256)."""
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    monkeypatch.setitem(cifar.OFFICIAL, name, (os.path.getsize(path), sha))


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_both_formats_read_nhwc_in_archive_order(tmp_path, fmt):
    path = write_archive(tmp_path / f"{fmt}.tar.gz", fmt)
    images, labels = cifar.read_archive(path, "train", order="archive")
    want_images, want_labels = expected(list(range(sum(TRAIN_SIZES))))
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    # CHW -> HWC: row 1, column 2 of the green channel of image 4.
    assert images[4, 1, 2, 1] == pixel(4, c=1, h=1, w=2) != pixel(4, c=1, h=2, w=1)
    images, labels = cifar.read_archive(path, "test", order="archive")
    np.testing.assert_array_equal(images, expected(batches()["test_batch"])[0])
    np.testing.assert_array_equal(labels, expected(batches()["test_batch"])[1])


def test_tfds_order():
    # TFDS's cifar10 train split begins with these examples (its `id` feature, e.g.
    # 'train_16399', as printed by tfds.load("cifar10")["train"]).
    published = [16399, 1680, 47917, 17307, 27051, 48736, 26263, 1456, 19135, 31598, 12970,
                 4223, 27152, 49635, 4093, 17537]
    order = cifar.tfds_order(50_000, "train")
    assert order[:16].tolist() == published
    assert sorted(order.tolist()) == list(range(50_000))
    assert cifar.tfds_order(10_000, "test")[:5].tolist() == [9933, 5669, 163, 6686, 4747]


def test_tfds_order_matches_tfds_shuffler(tmp_path):
    shuffle = pytest.importorskip("tensorflow_datasets.core.shuffle")  # no TensorFlow needed
    for split, n in (("train", 50_000), ("test", 10_000)):
        shuffler = shuffle.Shuffler(tmp_path, hash_salt=split)
        for i in range(n):
            shuffler.add(i, str(i).encode())
        assert [int(data) for _, data in shuffler] == cifar.tfds_order(n, split).tolist()


def test_default_order_is_tfds(tmp_path):
    path = write_archive(tmp_path / "a.tar.gz", "binary")
    images, labels = cifar.read_archive(path, "train")
    order = cifar.tfds_order(10, "train")
    np.testing.assert_array_equal(images, expected(order.tolist())[0])
    np.testing.assert_array_equal(labels, expected(order.tolist())[1])
    test_images, _ = cifar.read_archive(path, "test")
    np.testing.assert_array_equal(
        test_images, expected((100 + cifar.tfds_order(TEST_SIZE, "test")).tolist())[0])


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_truncated_archive_names_the_file(tmp_path, fmt):
    path = write_archive(tmp_path / f"{fmt}.tar.gz", fmt)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(DatasetError, match=re.escape(path) + ": cannot read the archive, it is "
                                           "truncated or damaged"):
        cifar.read_archive(path, "train")


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_missing_or_wrong_length_member(tmp_path, fmt):
    path = write_archive(tmp_path / "missing.tar.gz", fmt, skip="data_batch_3")
    with pytest.raises(DatasetError, match=f"{re.escape(path)}: not a CIFAR-10 archive: no member "
                                           "data_batch_3"):
        cifar.read_archive(path, "train")
    cifar.read_archive(path, "test")  # the test split does not need it
    path = write_archive(tmp_path / "long.tar.gz", fmt, extra=b"\0" * 5)
    with pytest.raises(DatasetError, match=rf"{re.escape(path)}: member .*data_batch_2.*"):
        cifar.read_archive(path, "train")
    with pytest.raises(DatasetError, match="not 'validation'.*tfds:cifar10"):
        cifar.read_archive(path, "validation")


class Payload:
    """Unpickled, it would make a folder: a pickle that runs code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickle_cannot_run_code(tmp_path):
    path = str(tmp_path / "evil.tar.gz")
    data = pickle.dumps({b"data": Payload(str(tmp_path / "ran")), b"labels": []}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match="refusing to load posix.mkdir"):
        cifar.read_archive(path, "test")
    assert not os.path.exists(tmp_path / "ran")


def test_label_out_of_range(tmp_path):
    path = str(tmp_path / "labels.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = 3073
        tar.addfile(info, io.BytesIO(bytes([12]) + raw_image(0)))
    with pytest.raises(DatasetError, match=re.escape(path) + ": label 12 is not"):
        cifar.read_archive(path, "test")


def test_official_name_is_checked_and_the_check_is_cached(tmp_path, monkeypatch):
    path = write_archive(tmp_path / cifar.PYTHON_ARCHIVE)
    with pytest.raises(DatasetError, match=f"{re.escape(path)}: .* bytes, but the official "
                                           f"{cifar.PYTHON_ARCHIVE} has 170,498,071"):
        cifar.load_cifar10(str(tmp_path), "train", download=False)
    monkeypatch.setitem(cifar.OFFICIAL, cifar.PYTHON_ARCHIVE, (os.path.getsize(path), "0" * 64))
    with pytest.raises(DatasetError, match=re.escape(path) + ": sha256 [0-9a-f]{64}, but the "
                                           "official archive has " + "0" * 64):
        cifar.load_cifar10(str(tmp_path), "train", download=False)
    official(monkeypatch, path, cifar.PYTHON_ARCHIVE)
    images, _ = cifar.load_cifar10(str(tmp_path), "test", download=False)
    assert images.shape == (TEST_SIZE, 32, 32, 3)
    assert os.path.exists(path + ".verified")
    hashed = []
    real_sha256 = cifar._sha256_file
    monkeypatch.setattr(cifar, "_sha256_file", lambda p: hashed.append(p) or real_sha256(p))
    cifar.load_cifar10(str(tmp_path), "test", download=False)
    assert hashed == []  # verified once: not hashed again
    os.utime(path, ns=(1, 1))  # a changed file is hashed again
    cifar.load_cifar10(str(tmp_path), "test", download=False)
    assert hashed == [path]


def test_python_archive_is_read_first(tmp_path, monkeypatch):
    path = write_archive(tmp_path / cifar.PYTHON_ARCHIVE)
    official(monkeypatch, path, cifar.PYTHON_ARCHIVE)
    (tmp_path / cifar.BINARY_ARCHIVE).write_bytes(b"not read")
    assert len(cifar.load_cifar10(str(tmp_path), "test", download=False)[1]) == TEST_SIZE


def test_tfds_layout_and_binary_archive_are_found(tmp_path, monkeypatch):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    path = write_archive(manual / cifar.BINARY_ARCHIVE, "binary")
    official(monkeypatch, path, cifar.BINARY_ARCHIVE)
    _, labels = cifar.load_cifar10(str(tmp_path), "train", download=False, order="archive")
    np.testing.assert_array_equal(labels, expected(list(range(10)))[1])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert cifar.default_dir() == str(tmp_path / "cache" / "immiscible_cm" / "cifar10")
    assert cifar.load_cifar10("", "train", download=False)[0].shape == (10, 32, 32, 3)


def test_offline_says_what_to_put_where(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    for download in (True, False):
        with pytest.raises(DatasetError) as e:
            cifar.load_cifar10(str(tmp_path / "data"), "train", download=download)
        message = str(e.value)
        assert ("no network" in message) == download
        assert f"into {tmp_path / 'data'}/" in message
        assert "downloads/manual" in message
        for name, (size, sha) in cifar.OFFICIAL.items():
            assert f"{name}  {size:,} bytes  sha256 {sha}  {cifar.URL_BASE}{name}" in message
    assert not os.listdir(tmp_path / "data")  # no partial download left


class Response(io.BytesIO):
    """urlopen's answer: the bytes, or a connection that breaks off after `cut` bytes
    (calling `on_cut` then)."""

    def __init__(self, data: bytes, cut: int = -1, on_cut=None):
        super().__init__(data)
        self.cut, self.on_cut = cut, on_cut

    def read(self, n: int = -1) -> bytes:
        if 0 <= self.cut <= self.tell():
            self.on_cut()
            raise ConnectionResetError("connection broke off")
        return super().read(min(n, 4096))


def test_download_is_atomic(tmp_path, monkeypatch):
    served = write_archive(tmp_path / "served.tar.gz")
    data = open(served, "rb").read()
    official(monkeypatch, served, cifar.PYTHON_ARCHIVE)
    dest = tmp_path / "data"
    during = []  # the folder's files when the connection breaks off
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(
        data, cut=len(data) // 2, on_cut=lambda: during.extend(os.listdir(dest))))
    with pytest.raises(DatasetError, match="connection broke off"):
        cifar.load_cifar10(str(dest), "train")
    assert len(during) == 1 and during[0].endswith(".part")  # a temporary name only
    assert not os.listdir(dest)  # and it is gone
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(data))
    images, labels = cifar.load_cifar10(str(dest), "train", order="archive")
    np.testing.assert_array_equal(images, expected(list(range(10)))[0])
    assert sorted(os.listdir(dest)) == [cifar.PYTHON_ARCHIVE, cifar.PYTHON_ARCHIVE + ".verified"]
    assert open(dest / cifar.PYTHON_ARCHIVE, "rb").read() == data
    # A download that is not the official archive is not kept.
    monkeypatch.setitem(cifar.OFFICIAL, cifar.PYTHON_ARCHIVE, (len(data), "0" * 64))
    with pytest.raises(DatasetError, match="expected .* bytes and 0000"):
        cifar.download_archive(str(tmp_path / "other"))
    assert not os.listdir(tmp_path / "other")
