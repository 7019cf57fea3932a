"""A small CNN classifier of Fashion-MNIST whose penultimate features replace Inception's.

Inception features are built for natural RGB images (and its weights cannot be fetched
everywhere); on 28x28 grayscale data the usual practice is a Fréchet distance in the
feature space of a classifier trained on the dataset itself. This module holds that
classifier, the code that trained it, and its weights: `evaluation/weights/
fashion_cnn-v1.npz` (sha256 `SHIPPED_SHA256`, 92.02% test accuracy), shipped with the
project and loaded by default, so that `fd_fashion` is the same metric on every machine
(training is deterministic on one machine, not across machines: two other machines gave
other weights with 92.02% and 92.23%). Other weights are used only when
`eval.fashion_weights` names them.

    python -m evaluation.fashion_net   # retrains into ~/.cache/immiscible_cm (transparency)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cm.data import idx

NAME = "fashion_cnn-v1"  # bump the version when the network or its training changes
SIZE = 28  # the network's input size
FEATURE_DIM = 256
NUM_CLASSES = 10
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training pixels in [0, 1]

Params = dict


class WeightsError(RuntimeError):
    """The cached classifier is missing, corrupt or from another version."""


class FashionCNN(nn.Module):
    """Three 3x3 convolutions (32, 64, 64 channels), each with ReLU and 2x2 max pooling
    (28 -> 14 -> 7 -> 3), a 256-unit ReLU layer (the features) and a 10-way linear
    classifier (dropout 0.3 before it in training). Input: [B, 28, 28, 1] in [0, 1]."""

    widths: Sequence[int] = (32, 64, 64)
    hidden: int = FEATURE_DIM
    dropout: float = 0.3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        x = (x - MEAN) / STD
        for w in self.widths:
            x = nn.relu(nn.Conv(w, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 28 -> 14 -> 7 -> 3
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(self.hidden)(x))  # [B, hidden]
        h = nn.Dropout(self.dropout, deterministic=not train)(feats)
        return feats, nn.Dense(NUM_CLASSES)(h)  # [B, hidden], [B, 10]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the classifier is trained (the defaults make the cached `fashion_cnn-v1`)."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3  # Adam, cosine decay to 0 over the run
    seed: int = 0
    widths: tuple[int, ...] = (32, 64, 64)
    hidden: int = FEATURE_DIM
    dropout: float = 0.3

    def net(self) -> FashionCNN:
        return FashionCNN(self.widths, self.hidden, self.dropout)


def to_input(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [N, S, S, 1] -> float32 [N, 28, 28, 1] in [0, 1].

    32x32 images are the 28x28 ones padded with background (`cm.data.idx.pad`): the border
    is cut off again. Other sizes are resized bilinearly (the same for generated and
    reference images, so the Fréchet distance compares like with like).
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    s = x.shape[1]
    if s == SIZE:
        return x
    if idx.pads_to(SIZE, s):
        m = (s - SIZE) // 2
        return x[:, m:m + SIZE, m:m + SIZE]
    return jax.image.resize(x, (x.shape[0], SIZE, SIZE, x.shape[-1]), "bilinear")


def train(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig = TrainConfig(),
          log: Callable[[str], None] = print) -> Params:
    """Trains the classifier on uint8 images [N, 28, 28, 1] and int labels [N].

    Deterministic: the initialisation and dropout keys come from `cfg.seed` (dropout
    folds in the step), each epoch's order from `(cfg.seed, epoch)`; the last partial
    batch of an epoch is dropped. On one machine, the same call gives the same bytes.

    Returns:
      the parameters.
    """
    if len(images) < cfg.batch_size:
        raise ValueError(f"{len(images)} images are fewer than one batch ({cfg.batch_size})")
    net = cfg.net()
    key = jax.random.PRNGKey(cfg.seed)
    params = net.init(key, jnp.zeros((1, SIZE, SIZE, 1)))["params"]
    steps_per_epoch = len(images) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, total))
    opt_state = tx.init(params)
    drop_key = jax.random.fold_in(key, 1)

    @jax.jit
    def step(params, opt_state, x, y, i):
        def loss_fn(p):
            _, logits = net.apply({"params": p}, to_input(x), train=True,
                                  rngs={"dropout": jax.random.fold_in(drop_key, i)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    labels = np.asarray(labels, np.int32)
    i = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(images))
        losses = []
        for b in range(steps_per_epoch):
            sel = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            params, opt_state, loss = step(params, opt_state, images[sel], labels[sel], i)
            losses.append(loss)
            i += 1
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {float(np.mean(losses)):.4f}, "
            f"{time.perf_counter() - t0:.0f} s")
    return jax.device_get(params)


@functools.cache
def _forward(widths: tuple[int, ...], hidden: int) -> Callable:
    net = FashionCNN(widths, hidden)
    return jax.jit(lambda p, x: net.apply({"params": p}, to_input(x)))


def feature_dim(params: Params) -> int:
    """The feature dimension (hidden units) of a classifier's parameters."""
    return _arch(params)[1]


def _arch(params: Params) -> tuple[tuple[int, ...], int]:
    """(conv widths, hidden size) read off the parameters."""
    convs = sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k[5:]))
    return (tuple(int(params[k]["kernel"].shape[-1]) for k in convs),
            int(params["Dense_0"]["kernel"].shape[-1]))


def features_and_logits(params: Params, images: np.ndarray, batch_size: int = 500,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and logits of uint8 images [N, S, S, 1].

    Returns:
      float32 features [N, hidden] and logits [N, 10]. Batches are padded to one shape,
      so the network compiles once per image size.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"expected uint8 images [N, H, W, 1], got {images.dtype} "
                         f"{images.shape}")
    widths, hidden = _arch(params)
    fwd = _forward(widths, hidden)
    n = len(images)
    batch = max(1, min(batch_size, n))
    feats, logits = [], []
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        valid = len(chunk)
        if valid < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - valid,) + chunk.shape[1:],
                                                    np.uint8)])
        f, lg = fwd(params, chunk)
        feats.append(np.asarray(f)[:valid])
        logits.append(np.asarray(lg)[:valid])
    if not feats:
        return np.zeros((0, hidden), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(feats), np.concatenate(logits)


def accuracy(params: Params, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose arg-max logit is their label."""
    _, logits = features_and_logits(params, images)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


# ----------------------------------------------------------------------------------------
# The cached weights: an .npz (flattened parameters + a JSON manifest) and its sha256.

_MANIFEST = "__manifest__"
# The weights every fd_fashion in docs/ was computed with: trained by `python -m
# evaluation.fashion_net` on 2026-12-06 (2 CPU cores, jax 0.10.2, 594 s), 92.02% on the
# 10,000 test images.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "fashion_cnn-v1.npz")
SHIPPED_SHA256 = "1c34e8657b9b81c2b16272278854f0d2ed99040f47c3f2463afc92f896cf43c1"


def weights_path(cache_dir: str) -> str:
    return os.path.join(os.path.expanduser(cache_dir), f"{NAME}.npz")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(path: str, params: Params, manifest: dict) -> str:
    """Writes the parameters and `manifest` to `path` and `path.sha256`, atomically (a
    temporary file, then a rename: concurrent trainers never leave a half file).

    Returns:
      the file's sha256.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    flat = {"/".join(k): np.asarray(v) for k, v in
            traverse_util.flatten_dict(params).items()}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **flat, **{_MANIFEST: np.array(json.dumps(manifest))})
    digest = _sha256(tmp)
    with open(f"{tmp}.sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(tmp, path)
    os.replace(f"{tmp}.sha256", f"{path}.sha256")
    return digest


def load(path: str, want: str | None = None) -> tuple[Params, dict]:
    """The parameters and manifest at `path`, after checking its sha256 (`want`, or the
    `.sha256` file beside it).

    Raises:
      WeightsError: no file, no or a different sha256, or an unreadable file.
    """
    if not os.path.isfile(path):
        raise WeightsError(f"no Fashion-MNIST classifier at {path}: train it with "
                           "`python -m evaluation.fashion_net`")
    if want is None:
        try:
            with open(f"{path}.sha256") as f:
                want = f.read().split()[0]
        except (OSError, IndexError) as e:
            raise WeightsError(f"{path}.sha256 is missing or empty: delete {path} and "
                               "retrain (`python -m evaluation.fashion_net --force`)") from e
    got = _sha256(path)
    if got != want:
        raise WeightsError(f"{path} is corrupt: sha256 {got[:16]}... but {path}.sha256 says "
                           f"{want[:16]}...; retrain with `python -m evaluation.fashion_net "
                           "--force`")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads(str(arrays.pop(_MANIFEST)))
    if manifest.get("name") != NAME:
        raise WeightsError(f"{path} holds {manifest.get('name')!r}, not {NAME!r}")
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
    return params, {**manifest, "sha256": got}


def train_and_save(cache_dir: str, data_dir: str = "", cfg: TrainConfig = TrainConfig(),
                   log: Callable[[str], None] = print, train_images: int = 0,
                   ) -> tuple[Params, dict]:
    """Trains on the Fashion-MNIST training split, measures the test split, saves.

    Args:
      train_images: train on the first this many images only (0: all 60,000; smoke runs).

    Returns:
      the parameters and the manifest (test accuracy, training seconds, sha256, ...).
    """
    path = idx.fashion_mnist_dir(data_dir)
    images, labels = idx.load_split(path, "train")
    if train_images:
        images, labels = images[:train_images], labels[:train_images]
    log(f"training the Fashion-MNIST classifier on {len(images)} images ({cfg})")
    t0 = time.perf_counter()
    params = train(images, labels, cfg, log)
    seconds = time.perf_counter() - t0
    test_images, test_labels = idx.load_split(path, "test")
    acc = accuracy(params, test_images, test_labels)
    manifest = {"name": NAME, "train_config": dataclasses.asdict(cfg),
                "test_accuracy": acc, "train_seconds": round(seconds, 1),
                "train_images": len(images), "jax": jax.__version__}
    out = weights_path(cache_dir)
    digest = save(out, params, manifest)
    log(f"test accuracy {acc:.4f} ({len(test_images)} images); trained in {seconds:.0f} s; "
        f"saved {out} (sha256 {digest[:16]}...)")
    return params, {**manifest, "sha256": digest}


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, size: int, mtime_ns: int, want: str | None,
                 ) -> tuple[Params, dict]:
    del size, mtime_ns  # only part of the cache key
    return load(path, want)


def load_weights(path: str = "") -> tuple[Params, dict]:
    """The classifier of `fd_fashion`: the shipped weights ('' , checked against
    `SHIPPED_SHA256`), or the file at `path` (with its `.sha256`), which makes another
    metric (its rows and reference statistics carry its sha256 prefix)."""
    if not path:
        stat = os.stat(SHIPPED)
        return _load_cached(SHIPPED, stat.st_size, stat.st_mtime_ns, SHIPPED_SHA256)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise WeightsError(f"eval.fashion_weights={path!r} does not exist; leave it empty for "
                           f"the shipped weights ({SHIPPED})")
    stat = os.stat(path)
    return _load_cached(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.fashion_net", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_dir", default="~/.cache/immiscible_cm",
                   help="where the weights go (the runs' eval.cache_dir)")
    p.add_argument("--data_dir", default="", help=f"Fashion-MNIST IDX folder (default "
                   f"{idx.FASHION_MNIST_DIR})")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--train_images", type=int, default=0,
                   help="train on the first N images only (smoke runs; 0 = all)")
    args = p.parse_args(argv)
    path = weights_path(args.cache_dir)
    if os.path.exists(path) and not args.force:
        _, manifest = load(path)
        print(f"{path} exists (sha256 {manifest['sha256'][:16]}...): test accuracy "
              f"{manifest['test_accuracy']:.4f}, trained in {manifest['train_seconds']} s; "
              "--force retrains")
        return 0
    train_and_save(args.cache_dir, args.data_dir, TrainConfig(epochs=args.epochs),
                   train_images=args.train_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
