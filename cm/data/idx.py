"""IDX files (MNIST, Fashion-MNIST, EMNIST) read with NumPy: images, labels, splits.

The IDX format (LeCun's MNIST page; Xiao et al. 2017 for Fashion-MNIST) is a big-endian
header (two zero bytes, a type code, the number of dimensions, then each dimension as
uint32) followed by the data. Files may be gzipped (detected from their first bytes, not
their name). Every check (magic number, dimensions, exact file length, images and labels
agreeing) raises `DatasetError` naming the file.
"""

import glob
import gzip
import os
import zlib

import numpy as np

from cm.data.sources import DatasetError

# Where `apt-get install dataset-fashion-mnist` puts the four gzipped IDX files (Debian).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_MAGIC = 0x00000803  # uint8, 3 dimensions [N, rows, cols]
LABEL_MAGIC = 0x00000801  # uint8, 1 dimension [N]

# IDX type code -> big-endian numpy dtype.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Split name -> the prefixes of its files: MNIST / Fashion-MNIST use 'train' and 't10k',
# EMNIST 'train' and 'test' (after a dataset prefix, e.g. 'emnist-letters-test-...').
SPLIT_TAGS = {"train": ("train",), "test": ("t10k", "test")}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({e}); download it "
                           "again") from e


def parse_idx(buf: bytes, name: str = "<bytes>") -> np.ndarray:
    """An IDX file's content as a numpy array (native byte order).

    Args:
      buf: the (uncompressed) file content.
      name: the file's name, for the errors.

    Returns:
      the array, shape from the header, dtype from the type code.

    Raises:
      DatasetError: not an IDX file (magic), a zero dimension, or a length that is not
        exactly header + data (truncated, or trailing bytes: a foreign file).
    """
    if len(buf) < 4:
        raise DatasetError(f"{name}: {len(buf)} bytes, too short for an IDX header")
    zero, code, ndim = int.from_bytes(buf[:2], "big"), buf[2], buf[3]
    magic = int.from_bytes(buf[:4], "big")
    if zero != 0 or code not in _DTYPES or ndim == 0:
        raise DatasetError(f"{name}: not an IDX file (magic number 0x{magic:08x}; expected "
                           f"0x0000TTNN with type TT in {sorted(hex(c) for c in _DTYPES)} "
                           "and NN >= 1 dimensions)")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetError(f"{name}: truncated header ({len(buf)} bytes, {header} needed for "
                           f"{ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(buf, ">u4", count=ndim, offset=4))
    if 0 in shape:
        raise DatasetError(f"{name}: a zero dimension in {shape}")
    dtype = np.dtype(_DTYPES[code])
    want = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) != want:
        what = "truncated" if len(buf) < want else "has trailing bytes (not this IDX file?)"
        raise DatasetError(f"{name}: {what}: {len(buf)} bytes, the header {shape} "
                           f"{dtype.name} says {want}")
    data = np.frombuffer(buf, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_idx(path: str, magic: int | None = None) -> np.ndarray:
    """Reads an IDX file (gzipped or not); `magic` (e.g. `IMAGE_MAGIC`) must match if given.

    Raises:
      DatasetError: see `parse_idx`; or the magic number is not the expected one.
    """
    buf = _read_bytes(path)
    if magic is not None and len(buf) >= 4 and int.from_bytes(buf[:4], "big") != magic:
        got = int.from_bytes(buf[:4], "big")
        kind = {IMAGE_MAGIC: "an images", LABEL_MAGIC: "a labels"}.get(magic, "an IDX")
        raise DatasetError(f"{path}: magic number 0x{got:08x}, expected 0x{magic:08x} "
                           f"({kind} file)")
    return parse_idx(buf, path)


def split_files(path: str, split: str) -> tuple[str, str | None]:
    """(images file, labels file or None) of a split.

    Args:
      path: a folder holding IDX files (MNIST's `train-images-idx3-ubyte.gz`,
        `t10k-labels-idx1-ubyte.gz`, ..., EMNIST's `emnist-<set>-test-images-...`), or
        one images file (then `split` is not used and the labels file is the one whose
        name has 'labels-idx1' for 'images-idx3', if it exists).
      split: 'train' or 'test'.

    Raises:
      DatasetError: no such folder or file, an unknown split, no images file of the split
        or several (name one with data.path).
    """
    if os.path.isfile(path):
        labels = os.path.join(os.path.dirname(path),
                              os.path.basename(path).replace("images-idx3", "labels-idx1"))
        return path, (labels if labels != path and os.path.isfile(labels) else None)
    if not os.path.isdir(path):
        raise DatasetError(f"IDX data.path {path!r} is neither a folder nor a file")
    if split not in SPLIT_TAGS:
        raise DatasetError(f"data.split={split!r}: IDX datasets have splits "
                           f"{sorted(SPLIT_TAGS)}")
    found = sorted({f for tag in SPLIT_TAGS[split]
                    for pattern in (f"{tag}-images-idx3-ubyte", f"*-{tag}-images-idx3-ubyte")
                    for f in glob.glob(os.path.join(path, pattern + "*"))
                    if f.endswith(("ubyte", "ubyte.gz"))})
    if not found:
        raise DatasetError(f"no {split} images in {path!r}: expected a file named like "
                           f"{SPLIT_TAGS[split][0]}-images-idx3-ubyte[.gz]")
    if len(found) > 1:
        names = ", ".join(os.path.basename(f) for f in found)
        raise DatasetError(f"several {split} image files in {path!r} ({names}): set "
                           "data.path to one of them")
    return split_files(found[0], split)


def load_split(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray | None]:
    """Images and labels of an IDX dataset split.

    Args:
      path: a folder or an images file (see `split_files`).
      split: 'train' or 'test'.

    Returns:
      uint8 images [N, rows, cols, 1] and int32 labels [N] (None without a labels file).

    Raises:
      DatasetError: a missing, truncated or foreign file, or images and labels that
        disagree in number.
    """
    images_path, labels_path = split_files(path, split)
    images = read_idx(images_path, IMAGE_MAGIC)[..., None]  # [N, H, W, 1]
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path, LABEL_MAGIC).astype(np.int32)
        if len(labels) != len(images):
            raise DatasetError(f"{labels_path} has {len(labels)} labels but {images_path} "
                               f"has {len(images)} images")
    return images, labels


def fashion_mnist_dir(path: str = "") -> str:
    """`path`, or the Debian folder; a missing dataset says how to install it."""
    path = path or FASHION_MNIST_DIR
    if not os.path.isdir(path) and not os.path.isfile(path):
        raise DatasetError(f"Fashion-MNIST not found at {path}: install it with "
                           f"`{FASHION_MNIST_INSTALL}` (as root), or set data.path to a "
                           "folder with its four IDX files")
    return path


def pads_to(native: int, size: int) -> bool:
    """Whether `native` px images are padded (not resized) to `size`: 28 -> 32, the usual
    LeNet-5 choice (LeCun et al. 1998), i.e. to 32 from any smaller size by an even margin."""
    return size == 32 and native < size and (size - native) % 2 == 0


def pad(images: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Pads `[N, H, W, C]` images evenly on all sides to `[N, size, size, C]` with `value`
    (0: the black background of MNIST-like images)."""
    h, w = images.shape[1:3]
    if (size - h) % 2 or (size - w) % 2 or size < max(h, w):
        raise ValueError(f"cannot pad {h}x{w} evenly to {size}x{size}")
    ph, pw = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=value)
