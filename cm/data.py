"""Image datasets held in host memory and deterministic, resumable batching.

Every dataset becomes one uint8 array `[N, H, W, C]`. A batch is a pure function of
(seed, step, process index): resuming at step k replays exactly the batches that the
uninterrupted run saw, and each process of a multi-host run takes its own slice of
the same global batch, which does not depend on the number of processes.
"""

import dataclasses
import os
from collections.abc import Callable

import ml_collections
import numpy as np
from PIL import Image

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


def load_npz_with_labels(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (array `images` or `x`) and, if present, int labels (`labels` or `y`)."""
    if not os.path.exists(path):
        raise DatasetError(f"data.path {path!r} does not exist")
    with np.load(path) as f:
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
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 255:
            raise DatasetError(f"{path}: non-uint8 images must lie in [0, 255]")
        images = images.astype(np.uint8)
    return images, labels


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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "cifar10"
    path: str = ""
    data_dir: str = ""
    split: str = "train"
    image_size: int = 32
    num_channels: int = 3
    random_flip: bool = True
    crop: int = 0  # center crop to crop x crop before resizing (0 = none)
    stream: str = "auto"  # folder / tfds:<name>: auto | never | always decode on access
    max_memory_gb: float = 16.0  # "auto" streams datasets larger than this, decoded

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "DataConfig":
        d = config.data
        return cls(name=d.name, path=d.path, data_dir=d.data_dir, split=d.split,
                   image_size=d.image_size, num_channels=d.num_channels,
                   random_flip=d.random_flip, crop=d.crop, stream=d.stream,
                   max_memory_gb=d.max_memory_gb)


def _load_folder(cfg: "DataConfig") -> tuple[np.ndarray, np.ndarray]:
    from cm import image_folder  # imports DatasetError from here

    return image_folder.load_folder(cfg.path, cfg.image_size, cfg.num_channels, cfg.stream,
                                    cfg.max_memory_gb)


def load_digits_with_labels(cfg: "DataConfig") -> tuple[np.ndarray, np.ndarray]:
    return load_digits(cfg.image_size), load_digits_labels()


def _load_idx(cfg: "DataConfig") -> tuple[np.ndarray, np.ndarray | None]:
    """IDX files (`idx`: `data.path`; `fashion_mnist`: `data.path` or the Debian folder),
    center-cropped, then padded 28 -> 32 with background (`idx.pads_to`) or resized."""
    from cm import idx  # imports DatasetError from here

    if cfg.name == "idx" and not cfg.path:
        raise DatasetError("data.name=idx needs data.path: a folder of IDX files or one "
                           "images file (e.g. train-images-idx3-ubyte.gz)")
    path = idx.fashion_mnist_dir(cfg.path) if cfg.name == "fashion_mnist" else cfg.path
    images, labels = idx.load_split(path, cfg.split)
    images = center_crop(images, cfg.crop)
    if idx.pads_to(images.shape[1], cfg.image_size):
        return idx.pad(images, cfg.image_size), labels
    return _resize(images, cfg.image_size), labels


# Each loader returns (uint8 images [N, H, W, C], int32 labels [N] or None).
LOADERS: dict[str, Callable[[DataConfig], tuple[np.ndarray, np.ndarray | None]]] = {
    "cifar10": lambda c: load_tfds_with_labels("cifar10", c.split, c.data_dir),
    "digits": load_digits_with_labels,
    "npz": lambda c: load_npz_with_labels(c.path),
    "folder": lambda c: _load_folder(c),
    "fashion_mnist": _load_idx,
    "idx": _load_idx,
}


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """The central `size x size` window of `[N, H, W, C]` (no-op if `size` is 0)."""
    h, w = images.shape[1:3]
    if size <= 0:
        return images
    if size > min(h, w):
        raise DatasetError(f"data.crop={size} is larger than the images ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def prepare(images: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Center crop (`data.crop`) then resize to `data.image_size`."""
    return _resize(center_crop(images, cfg.crop), cfg.image_size)


def _load_tfds_by_name(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    name = cfg.name.split(":", 1)[1]
    transform = lambda block: prepare(block, cfg)  # noqa: E731
    if cfg.stream != "never":
        import tensorflow_datasets as tfds

        from cm import streaming

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
        images = prepare(images, cfg)
    if images.shape[-1] != cfg.num_channels:
        raise DatasetError(f"dataset {cfg.name!r} has {images.shape[-1]} channels but "
                           f"data.num_channels={cfg.num_channels}")
    return images, labels


def load_images(cfg: DataConfig) -> np.ndarray:
    """The images of `load_dataset`."""
    return load_dataset(cfg)[0]


NOISE_BLOCK = 16  # global rows per noise generator (see `Batcher.noise`)
_NOISE_STREAM = 0x2015E
_FLIP_STREAM = 0xF11B


class Batcher:
    """Deterministic batches: `batch(step)` depends only on (seed, step, process layout).

    Examples are visited epoch by epoch in an order fixed by (seed, epoch); a global
    batch is the next `global_batch` positions of that stream, and process p takes
    rows `[p * B_host, (p + 1) * B_host)`. Flips and noise are functions of (seed,
    step, global row), so the global batch does not depend on how many processes
    share it: two processes with 2 devices each see the rows a single process with
    4 devices sees.
    """

    def __init__(self, images: np.ndarray, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, random_flip: bool = True,
                 labels: np.ndarray | None = None):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the "
                             f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.images = images  # uint8 [N, H, W, C]
        # [N] int32; a streamed dataset's labels (cm.streaming.LazyLabels) stay lazy.
        self.labels = np.asarray(labels, np.int32) if isinstance(labels, np.ndarray | list) \
            else labels
        self.global_batch = global_batch
        self.host_batch = global_batch // process_count
        self.seed = seed
        self.process_index = process_index
        self.random_flip = random_flip
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def row_start(self) -> int:
        """Index of this process's first row within a global batch."""
        return self.process_index * self.host_batch

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, epoch, 0xDA7A])
            self._perm_cache[epoch] = rng.permutation(len(self.images))
        return self._perm_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this process's rows of global batch `step`."""
        n = len(self.images)
        start = step * self.global_batch + self.row_start
        pos = np.arange(start, start + self.host_batch, dtype=np.int64)
        epochs, offsets = np.divmod(pos, n)
        out = np.empty(self.host_batch, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out

    def flips(self, step: int) -> np.ndarray:
        """Whether each of this process's rows is mirrored, `[B_host]` bool.

        Drawn for the whole global batch (a few bytes) and sliced, so a row's flip
        does not depend on the process count.
        """
        rng = np.random.default_rng([self.seed, step, _FLIP_STREAM])
        draws = rng.random(self.global_batch)
        return draws[self.row_start:self.row_start + self.host_batch] < 0.5

    def noise(self, step: int, row_shape: tuple[int, ...]) -> np.ndarray:
        """Gaussian noise for this process's rows, `[B_host, *row_shape]` float32.

        Global rows are grouped in blocks of `NOISE_BLOCK`, each block drawn by its own
        generator keyed by (seed, step, block), so that a row's noise depends on its
        global index only, not on the process count. One generator per row would cost
        ~60% more than one per batch at CIFAR-10's 512 x 32 x 32 x 3; blocks of 16
        cost ~15%. A host slice that starts or ends inside a block draws that whole
        block and keeps its part.
        """
        lo, hi = self.row_start, self.row_start + self.host_batch
        out = np.empty((self.host_batch,) + tuple(row_shape), np.float32)
        for block in range(lo // NOISE_BLOCK, -(-hi // NOISE_BLOCK)):
            b_lo, b_hi = block * NOISE_BLOCK, (block + 1) * NOISE_BLOCK
            rng = np.random.default_rng([self.seed, step, block, _NOISE_STREAM])
            if lo <= b_lo and b_hi <= hi:
                rng.standard_normal(out[b_lo - lo:b_hi - lo].shape, dtype=np.float32,
                                    out=out[b_lo - lo:b_hi - lo])
            else:
                full = rng.standard_normal((NOISE_BLOCK,) + tuple(row_shape),
                                           dtype=np.float32)
                a, b = max(lo, b_lo), min(hi, b_hi)
                out[a - lo:b - lo] = full[a - b_lo:b - b_lo]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Host batch: images `x` float32 in [-1, 1] and noise `z`, both `[B_host,H,W,C]`,
        and `label` int32 `[B_host]` when the dataset has labels."""
        idx = self.indices(step)
        x = self.images[idx].astype(np.float32) / 127.5 - 1.0
        if self.random_flip:
            flip = self.flips(step)
            x[flip] = x[flip, :, ::-1]
        z = self.noise(step, x.shape[1:])
        if self.labels is None:
            return {"x": x, "z": z}
        return {"x": x, "z": z, "label": self.labels[idx]}  # labels stay with their images

    def __call__(self, start_step: int):
        """Iterates batches from `start_step` on."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
