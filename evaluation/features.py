"""Feature kinds for Frechet distances, and the cached reference statistics of a dataset.

A registry maps a kind name to a factory: `inception` (pytorch-fid's pool features and
logits: FID and Inception Score), `pixels` (flattened images in [0, 1]: `fd_pixels`,
for the embedded digits, where no Inception applies, and for tests without weights) or
`fashion` (the penultimate features and logits of a Fashion-MNIST classifier,
`evaluation.fashion_net`: `fd_fashion` and a classifier score).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from cm import data
from cm.data import image_folder
from cm.runtime.views import DataConfig
from evaluation import fashion_net, fid, inception, weights

ImageShape = tuple[int, int, int]  # (H, W, C)
# uint8 images [N, H, W, C] -> (float features [N, D], logits [N, K] or None)
ExtractFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class Features:
    """A feature extractor and the name of the distance computed on its features.

    Attributes:
      kind: registry name ('inception', 'pixels', ...).
      metric: name of the Frechet distance in `eval.jsonl` ('fid', 'fd_pixels').
      dim: feature dimension D.
      extract: uint8 images [N, H, W, C] -> (features [N, D], logits [N, K] or None);
        logits (classifier outputs) give the Inception Score, None means no IS.
      version: what else identifies the features (e.g. a trained network's sha256
        prefix), so that reference statistics of other weights are never reused.
    """

    kind: str
    metric: str
    dim: int
    extract: ExtractFn
    version: str = ""

    @property
    def tag(self) -> str:
        """`kind`, or `kind-version`: names the reference statistics and eval rows."""
        return f"{self.kind}-{self.version}" if self.version else self.kind


@dataclasses.dataclass(frozen=True)
class Options:
    """What the extractors may need besides the image shape (the `eval` config fields)."""

    inception_path: str = ""
    cache_dir: str = weights.DEFAULT_CACHE_DIR
    batch_size: int = 200
    fashion_weights: str = ""  # '' = the shipped classifier (evaluation/weights/)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, H*W*C] in [0, 1]."""
    images = np.asarray(images)
    return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0


def _pixels(shape: ImageShape, options: Options) -> Features:
    del options
    return Features("pixels", "fd_pixels", int(np.prod(shape)),
                    lambda images: (pixel_features(images), None))


def _inception(shape: ImageShape, options: Options) -> Features:
    if shape[-1] not in (1, 3):
        raise ValueError(f"Inception features need 1 or 3 channels, got images of shape {shape}")
    variables = weights.load_inception_variables(options.inception_path, options.cache_dir)

    def extract(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if images.shape[-1] == 1:  # grayscale: the same image in R, G and B
            images = np.repeat(images, 3, axis=-1)
        return inception.features_and_logits(variables, images, options.batch_size)

    return Features("inception", "fid", inception.FEATURE_DIM, extract)


def _fashion(shape: ImageShape, options: Options) -> Features:
    if shape[-1] != 1:
        raise ValueError(f"fashion features need grayscale images, got shape {shape}")
    params, manifest = fashion_net.load_weights(options.fashion_weights)
    if manifest["sha256"] != fashion_net.SHIPPED_SHA256:
        logging.warning("fashion features from eval.fashion_weights=%s, not the shipped "
                        "classifier: its fd_fashion is not comparable with the docs' (rows "
                        "carry its sha256 prefix %s)", options.fashion_weights,
                        manifest["sha256"][:8])
    logging.info("fashion features: %s (test accuracy %.4f, sha256 %s)",
                 options.fashion_weights or fashion_net.SHIPPED, manifest["test_accuracy"],
                 manifest["sha256"][:16])
    return Features("fashion", "fd_fashion", fashion_net.feature_dim(params),
                    lambda images: fashion_net.features_and_logits(params, images,
                                                                   options.batch_size),
                    version=manifest["sha256"][:8])


FeatureFactory = Callable[[ImageShape, Options], Features]
FEATURES: dict[str, FeatureFactory] = {"inception": _inception, "pixels": _pixels,
                                       "fashion": _fashion}
AUTO_KIND = {"digits": "pixels", "fashion_mnist": "fashion"}  # data.name -> kind of 'auto'


def resolve_kind(kind: str, data_cfg: DataConfig) -> str:
    """`eval.features`; 'auto' = `AUTO_KIND` of the dataset, else pixels for 1-channel data
    and inception for the rest."""
    if kind == "auto":
        return AUTO_KIND.get(data_cfg.name,
                             "pixels" if data_cfg.num_channels == 1 else "inception")
    if kind not in FEATURES:
        raise ValueError(f"unknown eval.features {kind!r}; expected 'auto' or one of "
                         f"{sorted(FEATURES)}")
    return kind


def make_features(kind: str, data_cfg: DataConfig, options: Options) -> Features:
    """The extractor of `kind` ('auto' resolved by `resolve_kind`) for the dataset's images."""
    kind = resolve_kind(kind, data_cfg)
    shape = (data_cfg.image_size, data_cfg.image_size, data_cfg.num_channels)
    return FEATURES[kind](shape, options)


def _dataset_tag(data_cfg: DataConfig) -> str:
    crop = f"-crop{data_cfg.crop}" if data_cfg.crop else ""
    if data_cfg.name == "idx":  # a user's folder or file: its name and a digest of its path
        path = os.path.realpath(os.path.expanduser(data_cfg.path))
        digest = hashlib.sha256(path.encode()).hexdigest()[:8]
        return f"idx-{os.path.basename(path.rstrip(os.sep))}-{digest}{crop}"
    h = hashlib.sha256()
    if data_cfg.name == "npz":
        # A user's file: its name and a digest of its bytes, so a changed file is not reused.
        with open(data_cfg.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(data_cfg.value_range.encode())
    elif data_cfg.name == "folder":
        # Another folder of the same size is another dataset: a digest of its file list,
        # sizes and modification times (a stat per file, no reading).
        root = os.path.abspath(data_cfg.path)
        for path, _ in image_folder.list_images(root):
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode())
    else:
        return data_cfg.name + crop
    stem = os.path.splitext(os.path.basename(os.path.normpath(data_cfg.path)))[0]
    return f"{data_cfg.name}-{stem}-{h.hexdigest()[:8]}{crop}"


def reference_path(data_cfg: DataConfig, kind: str, stats_path: str = "",
                   cache_dir: str = weights.DEFAULT_CACHE_DIR) -> str:
    """`stats_path` if given, else `<cache_dir>/fid_stats/<dataset>_<split>_<S>px_<kind>.npz`."""
    if stats_path:
        return os.path.expanduser(stats_path)
    s = data_cfg.image_size
    name = f"{_dataset_tag(data_cfg)}_{data_cfg.split}_{s}px_{kind}.npz"
    return os.path.join(os.path.expanduser(cache_dir), "fid_stats", name)


def dataset_stats(images: np.ndarray, features: Features, chunk: int = 5000) -> fid.FeatureStats:
    """Mean and covariance of the features of uint8 images [N, H, W, C], streamed by chunks."""
    stats = fid.RunningStats(features.dim)
    for start in range(0, len(images), chunk):
        feats, _ = features.extract(images[start:start + chunk])
        stats.update(feats)
        logging.info("reference features: %d/%d images", stats.n, len(images))
    return fid.FeatureStats(stats.mean, stats.cov, stats.n)


def ensure_reference(data_cfg: DataConfig, features: Features, path: str,
                     chunk: int = 5000) -> fid.FeatureStats:
    """The reference statistics at `path`; computed from the dataset and saved if absent.

    Only process 0 writes (atomically: a temporary file, then a rename), so an
    interrupted computation leaves no partial file behind.
    """
    if os.path.exists(path):
        ref = fid.load_stats(path)
        if ref.mu.shape != (features.dim,):
            raise ValueError(f"reference statistics {path} have dimension {ref.mu.shape[0]}, "
                             f"but {features.kind} features have {features.dim}: set "
                             "eval.stats_path to statistics of the same feature kind")
        logging.info("reference statistics: %s (%s images)", path, ref.n)
        return ref
    images = data.load_images(data_cfg)
    logging.info("computing %s reference statistics of %s/%s (%d images) into %s",
                 features.kind, data_cfg.name, data_cfg.split, len(images), path)
    ref = dataset_stats(images, features, chunk)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        fid.save_stats(tmp, ref.mu, ref.sigma, ref.n)
        os.replace(tmp, path)
    return ref
