"""CIFAR-10 read from the official archives with NumPy: no TensorFlow, no torch.

Reads `cifar-10-python.tar.gz` (pickled batches) or `cifar-10-binary.tar.gz` (records of
1 label byte + 3072 pixel bytes, channel-major) straight from the tarball, and returns
uint8 images `[N, 32, 32, 3]` with int32 labels `[N]`. An archive with an official name is
checked against its official size and sha256 once; the result is cached beside it in
`<archive>.verified`, so later runs do not hash 170 MB again.

Order: by default the examples come in the order of TFDS's `cifar10` split (which the
project's FID statistics and earlier runs used). TFDS keys the archive's i-th example
with the integer i and writes the examples sorted by the 128-bit md5 of the split name
(its salt) followed by `str(i)` (`tensorflow_datasets/core/hashing.py: Hasher.hash_key`,
`core/shuffle.py: Shuffler`, `core/split_builder.py: hash_salt=split_name`); `tfds_order`
reproduces this with `hashlib`, so the arrays equal those of `data.name=tfds:cifar10`.
"""

import codecs
import contextlib
import hashlib
import http.client
import io
import json
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np
from absl import logging

from cm.data.sources import DatasetError

PYTHON_ARCHIVE = "cifar-10-python.tar.gz"
BINARY_ARCHIVE = "cifar-10-binary.tar.gz"
URL_BASE = "https://www.cs.toronto.edu/~kriz/"
URL = URL_BASE + PYTHON_ARCHIVE  # the archive downloaded when none is found
# Official name -> (size in bytes, sha256). Python archive: the sha256 Keras checks
# (keras/datasets/cifar10.py); its md5 c58f30108f718f92721af3b95e74349a is the one
# published with it. Binary archive: tensorflow_datasets/url_checksums/cifar10.txt.
OFFICIAL: dict[str, tuple[int, str]] = {
    PYTHON_ARCHIVE: (170_498_071,
                     "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    BINARY_ARCHIVE: (170_052_171,
                     "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
}
# The name TFDS gives its own download of the binary archive in `<tfds dir>/downloads/`
# (tensorflow_datasets/core/download/resource.py: get_dl_fname(url, sha256)).
TFDS_DOWNLOAD_NAME = ("cs.toronto.edu_kriz_cifar-10-binary"
                      "xKOMUKG8XzocVTfyFVq51o-fJese2Nnd2j2ymlm8od0.tar.gz")
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
ORDERS = ("tfds", "archive")
_PIXELS = 3 * 32 * 32
_RECORD = 1 + _PIXELS  # one record of the binary format: label byte, then CHW pixels
# Globals a pickled batch may name: numpy arrays (Python 2 and NumPy 2 module names) and
# the bytes constructor of protocol-2 pickles written by Python 3. Nothing else runs.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


def default_dir() -> str:
    """Where `load_cifar10('')` downloads the archive: `$XDG_CACHE_HOME/immiscible_cm/cifar10`
    (`~/.cache/immiscible_cm/cifar10`)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "immiscible_cm", "cifar10")


def candidates(data_dir: str) -> list[tuple[str, str]]:
    """(path, official name) of every place an archive is looked for, in order.

    `data_dir`, then `data_dir/downloads/manual/` (a TFDS data dir's manual folder); for
    `data_dir` '': `default_dir()`, then `downloads/manual/` of the TFDS data dir
    (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). In each the python archive, then the
    binary one; last, TFDS's own download of the binary archive (`downloads/`).
    """
    tfds_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    tfds_dir = os.path.expanduser(tfds_dir)
    dirs = [os.path.expanduser(data_dir)] if data_dir else [default_dir()]
    dirs.append(os.path.join(tfds_dir, "downloads", "manual"))
    found = [(os.path.join(d, n), n) for d in dirs for n in (PYTHON_ARCHIVE, BINARY_ARCHIVE)]
    return found + [(os.path.join(tfds_dir, "downloads", TFDS_DOWNLOAD_NAME), BINARY_ARCHIVE)]


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: str, sha256: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _check(split: str, order: str) -> None:
    if split not in BATCHES:
        raise DatasetError(f"CIFAR-10 has splits 'train' and 'test', not {split!r} (for TFDS "
                           "slices such as 'train[:10%]' use data.name=tfds:cifar10)")
    if order not in ORDERS:
        raise DatasetError(f"CIFAR-10 order {order!r}: expected one of {ORDERS}")


def _write_stamp(path: str, sha256: str) -> None:
    """Records `path`'s verified sha256 (with its size and mtime) in `<path>.verified`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".verified.", dir=os.path.dirname(path) or ".")
        with os.fdopen(fd, "w") as f:
            json.dump(_stamp(path, sha256), f)
        os.replace(tmp, path + ".verified")
    except OSError as e:  # a read-only folder: hash again next time
        logging.info("CIFAR-10: cannot record the verified checksum of %s: %s", path, e)


def verify(path: str, expected: tuple[int, str]) -> None:
    """Checks the archive's size and sha256, or finds them already verified.

    Raises:
      DatasetError: naming the file, for a wrong size (truncated or another file) or a
        wrong sha256 (damaged or another file).
    """
    size, sha256 = expected
    got_size = os.path.getsize(path)
    if got_size != size:
        raise DatasetError(f"{path}: {got_size:,} bytes, but the official "
                           f"{os.path.basename(path)} has {size:,}: truncated or a different "
                           "file. Delete it and download it again.")
    with contextlib.suppress(OSError, ValueError), open(path + ".verified") as f:
        if json.load(f) == _stamp(path, sha256):
            return
    got = _sha256_file(path)
    if got != sha256:
        raise DatasetError(f"{path}: sha256 {got}, but the official archive has {sha256}: "
                           "a damaged or different file. Delete it and download it again.")
    _write_stamp(path, sha256)


def tfds_order(n: int, split: str) -> np.ndarray:
    """The archive indices of TFDS's split `split` (n examples), in TFDS's order.

    TFDS sorts the examples by `int(md5(salt + str(key)).hexdigest(), 16)`, salt = the split
    name, key = the example's index in the archive; sorting the big-endian digests is the
    same order. The train split starts 16399, 1680, 47917 ('train_16399', ... as TFDS's
    `id` feature reads).
    """
    salted = hashlib.md5(split.encode())

    def key(i: int) -> bytes:
        md5 = salted.copy()
        md5.update(str(i).encode())
        return md5.digest()

    return np.array(sorted(range(n), key=key), np.int64)


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _parse_python(buf: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A pickled batch (dict with `b'data'` uint8 `[n, 3072]`, `b'labels'`) -> CHW, labels."""
    try:
        stream = io.BytesIO(buf)
        batch = _BatchUnpickler(stream, encoding="bytes").load()
        if stream.tell() != len(buf):
            raise DatasetError(f"{where}: wrong length: {len(buf) - stream.tell():,} bytes "
                               "after the pickled batch")
        data = np.asarray(batch.get(b"data", batch.get("data")))
        labels = np.asarray(batch.get(b"labels", batch.get("labels")))
    except DatasetError:
        raise
    except Exception as e:  # any damage: UnpicklingError, EOFError, AttributeError, ...
        raise DatasetError(f"{where}: not a CIFAR-10 pickled batch ({type(e).__name__}: {e})"
                           ) from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DatasetError(f"{where}: wrong length: data is {data.dtype} {data.shape}, "
                           f"expected uint8 [n, {_PIXELS}]")
    if labels.shape != (len(data),):
        raise DatasetError(f"{where}: wrong length: {labels.size} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def _parse_binary(buf: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Records of 1 label byte + 3072 pixel bytes -> CHW `[n, 3, 32, 32]`, labels."""
    if not buf or len(buf) % _RECORD:
        raise DatasetError(f"{where}: wrong length: {len(buf):,} bytes is not a whole number "
                           f"of {_RECORD}-byte records")
    records = np.frombuffer(buf, np.uint8).reshape(-1, _RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0]


def read_archive(path: str, split: str, expected: tuple[int, str] | None = None,
                 order: str = "tfds") -> tuple[np.ndarray, np.ndarray]:
    """One split of a CIFAR-10 archive in either official format (told by its members).

    Args:
      path: a `.tar.gz` (or `.tar`) holding `data_batch_1..5` and `test_batch` (python
        format) or the same names with `.bin` (binary format), in any folder inside.
      split: 'train' (the five data batches) or 'test'.
      expected: (size, sha256) to verify first (`verify`); None checks only the format.
      order: 'tfds' (TFDS's order, `tfds_order`) or 'archive' (batch 1 to 5, as stored).

    Returns:
      uint8 images `[N, 32, 32, 3]` and int32 labels `[N]`.

    Raises:
      DatasetError: naming the file, for a wrong size or checksum, an unreadable or
        truncated archive, a missing batch, or a batch of the wrong length.
    """
    _check(split, order)
    if expected is not None:
        verify(path, expected)
    wanted = {n + ext: n for n in BATCHES[split] for ext in ("", ".bin")}
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    formats: set[str] = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    buf = tar.extractfile(member).read()
                    where = f"{path}: member {member.name}"
                    binary = base.endswith(".bin")
                    formats.add("binary" if binary else "python")
                    parse = _parse_binary if binary else _parse_python
                    parts[wanted[base]] = parse(buf, where)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DatasetError(f"{path}: cannot read the archive, it is truncated or damaged "
                           f"({type(e).__name__}: {e}). Delete it and download it again."
                           ) from e
    missing = [n for n in BATCHES[split] if n not in parts]
    if missing or len(formats) > 1:
        problem = f"no member {', '.join(missing)}" if missing else "both formats mixed"
        raise DatasetError(f"{path}: not a CIFAR-10 archive: {problem} (the python archive "
                           "holds data_batch_1..5 and test_batch, the binary one the same "
                           "names with .bin)")
    chw = np.concatenate([parts[n][0] for n in BATCHES[split]])
    labels = np.concatenate([parts[n][1] for n in BATCHES[split]]).astype(np.int32)
    if labels.size and labels.max() >= 10:
        raise DatasetError(f"{path}: label {labels.max()} is not a CIFAR-10 class (0..9)")
    if order == "tfds":
        perm = tfds_order(len(labels), split)
        chw, labels = chw[perm], labels[perm]
    return np.ascontiguousarray(chw.transpose(0, 2, 3, 1)), labels


def _instructions(where: str) -> str:
    lines = [f"Put one of the official CIFAR-10 archives (TensorFlow is not needed) into "
             f"{where}/ (a TFDS data dir's downloads/manual/ works too):"]
    for name, (size, sha256) in OFFICIAL.items():
        lines.append(f"  {name}  {size:,} bytes  sha256 {sha256}  {URL_BASE}{name}")
    lines.append("or set --config.data.data_dir to the folder that holds one.")
    return "\n".join(lines)


def download_archive(dest_dir: str, url: str = URL) -> str:
    """Downloads the python archive into `dest_dir`, atomically; returns its path.

    Written to a temporary name in `dest_dir`, checked (size and sha256), then renamed:
    the archive's name never holds a partial file. Progress goes to the log.

    Raises:
      DatasetError: the download does not match the official size or sha256.
      OSError, http.client.HTTPException: no connection, or it broke off.
    """
    size, sha256 = OFFICIAL[PYTHON_ARCHIVE]
    os.makedirs(dest_dir, exist_ok=True)
    final = os.path.join(dest_dir, PYTHON_ARCHIVE)
    fd, tmp = tempfile.mkstemp(prefix=f".{PYTHON_ARCHIVE}.", suffix=".part", dir=dest_dir)
    try:
        digest, done, next_log = hashlib.sha256(), 0, 0
        logging.info("CIFAR-10: downloading %s (%.0f MB) into %s", url, size / 1e6, dest_dir)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if done >= next_log:
                    logging.info("CIFAR-10: %.0f / %.0f MB", done / 1e6, size / 1e6)
                    next_log += size // 10
        if done != size or digest.hexdigest() != sha256:
            raise DatasetError(f"{url}: downloaded {done:,} bytes with sha256 "
                               f"{digest.hexdigest()}, expected {size:,} bytes and {sha256}\n"
                               + _instructions(dest_dir))
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _write_stamp(final, sha256)
    return final


def load_cifar10(data_dir: str, split: str, download: bool = True,
                 order: str = "tfds") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's split `split` as uint8 images `[N, 32, 32, 3]` and int32 labels `[N]`.

    Args:
      data_dir: folder holding `cifar-10-python.tar.gz` or `cifar-10-binary.tar.gz`
        (there or in its `downloads/manual/`, TFDS's layout); '' looks in `default_dir()`
        and in the TFDS data dir (see `candidates`).
      split: 'train' (50,000) or 'test' (10,000).
      download: if no archive is found, download the python archive into `data_dir`
        (or `default_dir()`); if False, or the download fails, say what to put where.
      order: 'tfds' (default: the order of TFDS's `cifar10`) or 'archive'.

    Raises:
      DatasetError: no archive (with instructions), or a damaged one (naming it).
    """
    _check(split, order)
    for path, name in candidates(data_dir):
        if os.path.isfile(path):
            return read_archive(path, split, OFFICIAL[name], order)
    where = os.path.expanduser(data_dir) if data_dir else default_dir()
    looked = ", ".join(sorted({os.path.dirname(p) for p, _ in candidates(data_dir)}))
    if not download:
        raise DatasetError(f"CIFAR-10 not found (looked in {looked}; downloading is off).\n"
                           + _instructions(where))
    try:
        path = download_archive(where)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DatasetError(f"CIFAR-10 not found (looked in {looked}) and downloading {URL} "
                           f"failed ({type(e).__name__}: {e}).\n" + _instructions(where)) from e
    return read_archive(path, split, OFFICIAL[PYTHON_ARCHIVE], order)
