"""Where images come from: in-memory readers for the built-in sources, and `DatasetError`.

The bottom of `cm.data`: sklearn's digits, `.npz` arrays and prepared TFDS datasets,
each read into one uint8 array `[N, H, W, C]` (and int32 labels when there are any),
plus the crop / resize every source shares.
"""

import os
import zipfile
from collections.abc import Callable

import numpy as np
from PIL import Image

from cm.data import pixels

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"


class DatasetError(RuntimeError):
    """A dataset could not be loaded; the message says what to do."""


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 `[N, H, W, C]` to `[N, size, size, C]`."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = []
    for im in images:
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        arr = np.asarray(pil.resize((size, size), Image.BILINEAR))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out).astype(np.uint8)


def load_digits(image_size: int = 8) -> np.ndarray:
    """sklearn's 1,797 handwritten 8x8 digits (shipped with scikit-learn), uint8 `[N,S,S,1]`."""
    from sklearn.datasets import load_digits as _load

    images = _load().images  # [1797, 8, 8], values 0..16
    images = np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _resize(images, image_size)


def load_digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits as _load

    return _load().target.astype(np.int32)


def load_npz_with_labels(path: str, value_range: str = "",
                         ) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (array `images` or `x`) and, if present, int labels (`labels` or `y`).

    Images that are not uint8 need `value_range` (see `cm.data.pixels.to_uint8`).
    """
    if not os.path.exists(path):
        raise DatasetError(f"data.path {path!r} does not exist")
    with _open_npz(path) as f:
        keys = [k for k in ("images", "x") if k in f]
        if not keys:
            raise DatasetError(f"{path}: expected an array named 'images' or 'x', found "
                               f"{sorted(f.keys())}")
        images = f[keys[0]]
        label_keys = [k for k in ("labels", "y") if k in f]
        labels = np.asarray(f[label_keys[0]]).astype(np.int32) if label_keys else None
    if labels is not None and labels.shape != (len(images),):
        raise DatasetError(f"{path}: labels must be [N] = [{len(images)}], got {labels.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(f"{path}: images must be [N,H,W] or [N,H,W,C] with C in (1, 3), "
                           f"got shape {images.shape}")
    try:
        images = pixels.to_uint8(images, value_range)
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from e
    return images, labels


def _open_npz(path: str):
    """`np.load` of an .npz archive, or a DatasetError saying what the file is instead."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise DatasetError(f"data.path {path!r} is a single .npy array, not an .npz archive: "
                           "save it with np.savez(path, images=images)")
    if not head.startswith(b"PK"):
        raise DatasetError(f"data.path {path!r} is not an .npz archive (a zip of arrays, as "
                           "np.savez writes); it starts with " + repr(head))
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"data.path {path!r} is not a readable .npz archive: {e}") from e


def _cifar_help(data_dir: str) -> str:
    where = data_dir or "~/tensorflow_datasets"
    prepare = (f"tfds.builder('cifar10', data_dir='{where}', file_format='array_record')"
               ".download_and_prepare(")
    return (
        f"CIFAR-10 is not prepared in the tensorflow-datasets data dir {where!r}.\n"
        "On a machine with internet (needs `pip install tensorflow` once, for preparing):\n"
        f"  python -c \"import tensorflow_datasets as tfds; {prepare})\"\n"
        f"On a machine without internet, copy the archive {CIFAR10_ARCHIVE} (170,052,171 "
        "bytes, sha256 c4a38c50...a1dd, from https://www.cs.toronto.edu/~kriz/) into "
        f"{where}/downloads/manual/ and run\n"
        f"  python -c \"import tensorflow_datasets as tfds; {prepare}download_config="
        f"tfds.download.DownloadConfig(manual_dir='{where}/downloads/manual'))\"\n"
        "or copy an already prepared cifar10/3.0.2/ folder (array_record format) into that "
        "data dir. Set --config.data.data_dir if it is not the default."
    )


def _read_source(source, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads every example in chunks; `transform` (crop/resize) is applied per chunk so
    that only the final-size images are ever held in memory."""
    n = len(source)
    images = None
    labels = np.zeros(n, np.int32)
    has_labels = True
    chunk = 1000
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        try:
            items = source.__getitems__(idx)
        except (AttributeError, TypeError):  # e.g. tfds.testing.mock_data's source
            items = [source[i] for i in idx]
        arrays = [np.asarray(it["image"]) for it in items]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        if len({a.shape for a in arrays}) > 1:  # mixed sizes: crop/resize one by one
            if transform is None:
                raise DatasetError(f"images of different shapes {sorted({a.shape for a in arrays})}"
                                   " in one dataset: set data.crop / data.image_size")
            block = np.concatenate([transform(a[None]) for a in arrays])
        else:
            block = np.stack(arrays)
            if transform is not None:
                block = transform(block)
        if images is None:
            images = np.empty((n,) + block.shape[1:], np.uint8)
        images[start:start + len(idx)] = block
        has_labels = has_labels and all("label" in it for it in items)
        if has_labels:
            labels[start:start + len(idx)] = [int(it["label"]) for it in items]
    if images is None:
        raise DatasetError("the dataset split is empty")
    return images, (labels if has_labels else None)


def load_tfds_with_labels(name: str, split: str, data_dir: str = "",
                          transform: Callable[[np.ndarray], np.ndarray] | None = None,
                          ) -> tuple[np.ndarray, np.ndarray | None]:
    """A prepared TFDS image dataset as uint8 `[N, H, W, C]` and its int labels, if any.

    Reads the ArrayRecord files with `tfds.data_source` (no TensorFlow needed); a
    dataset prepared in the TFRecord format is read with `tfds.load` if TensorFlow is
    installed.
    """
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                  download=False)
        return _read_source(source, transform)
    except Exception as first:  # tfds raises several types for "not prepared"
        try:
            arrays = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir or None,
                                             batch_size=-1, download=False))
            labels = arrays.get("label")
            images = np.asarray(arrays["image"], np.uint8)
            return (transform(images) if transform else images,
                    None if labels is None else np.asarray(labels, np.int32))
        except Exception:
            pass
        help_text = (_cifar_help(data_dir) if name == "cifar10" else
                     f"dataset {name!r} split {split!r} is not prepared in "
                     f"{data_dir or '~/tensorflow_datasets'!r}")
        raise DatasetError(f"{help_text}\n(tfds said: {str(first).splitlines()[0]})") from first


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """The central `size x size` window of `[N, H, W, C]` (no-op if `size` is 0)."""
    h, w = images.shape[1:3]
    if size <= 0:
        return images
    if size > min(h, w):
        raise DatasetError(f"data.crop={size} is larger than the images ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def prepare(images: np.ndarray, crop: int, image_size: int) -> np.ndarray:
    """Center crop to `crop` (0 = none) then resize to `image_size`."""
    return _resize(center_crop(images, crop), image_size)
