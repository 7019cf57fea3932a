"""One-step and multistep consistency sampling, and image grids.

Multistep sampling (Song et al. 2023, Algorithm 1): x = f(t_0 z, t_0); then for each
later time t: x <- f(x + sqrt(t^2 - sigma_min^2) z', t).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from cm import consistency


def sample(apply_fn: consistency.ApplyFn, params, cfg: consistency.CMConfig,
           key: jax.Array, shape: tuple[int, ...], ts: Sequence[float],
           labels: jax.Array | None = None) -> jax.Array:
    """Draws `shape[0]` images in [-1, 1] with the descending times `ts` (jittable)."""
    if not ts:
        raise ValueError("sampling needs at least one time")
    if any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"sampling times must be strictly descending, got {tuple(ts)}")
    keys = jax.random.split(key, len(ts))
    b = shape[0]
    x = ts[0] * jax.random.normal(keys[0], shape)
    x = consistency.consistency_fn(apply_fn, params, x, jnp.full((b,), ts[0]), cfg, labels)
    for t, k in zip(ts[1:], keys[1:], strict=True):
        noise = jax.random.normal(k, shape)
        x = x + np.sqrt(max(t**2 - cfg.sigma_min**2, 0.0)) * noise
        x = consistency.consistency_fn(apply_fn, params, x, jnp.full((b,), t), cfg, labels)
    return jnp.clip(x, -1.0, 1.0)


def make_sampler(apply_fn: consistency.ApplyFn, cfg: consistency.CMConfig, mesh: Mesh,
                 image_shape: tuple[int, int, int], ts: Sequence[float], num_classes: int = 0,
                 sample_fn=None):
    """Jitted `sampler(params, key, batch_size, labels=None) -> uint8 [B,H,W,C]` over the mesh.

    For a class-conditional model (`num_classes > 0`) `labels` `[B]` picks the classes;
    without it the classes are drawn uniformly from `key` (what class-conditional FID
    against the whole training set needs). `sample_fn(apply_fn, params, cfg, key, shape,
    labels)` replaces consistency sampling at times `ts` (e.g. an EDM ODE solver).
    """
    if sample_fn is None:
        sample_fn = lambda f, p, c, k, shape, labels: sample(f, p, c, k, shape, ts, labels)  # noqa: E731
    out_sharding = NamedSharding(mesh, P("data"))
    ts = tuple(float(t) for t in ts)

    @functools.partial(jax.jit, static_argnums=(2,), out_shardings=out_sharding)
    def _run(params, key, batch_size, labels):
        if num_classes > 0 and labels is None:
            key, label_key = jax.random.split(key)
            labels = jax.random.randint(label_key, (batch_size,), 0, num_classes)
        x = sample_fn(apply_fn, params, cfg, key, (batch_size,) + image_shape, labels)
        return jnp.round((x + 1.0) * 127.5).astype(jnp.uint8)

    def sampler(params, key, batch_size: int, labels=None):
        if labels is not None:
            if num_classes <= 0:
                raise ValueError("labels given to an unconditional model")
            labels = jnp.asarray(labels, jnp.int32)
        return _run(params, key, batch_size, labels)

    return sampler


def class_grid_labels(n: int, num_classes: int) -> np.ndarray:
    """Labels `[n]` cycling through the classes, so a grid's columns are classes."""
    return np.arange(n, dtype=np.int32) % num_classes


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 `[N,H,W,C]` into one `[rows*(H+pad)+pad, cols*(W+pad)+pad, C]` image."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = im
    return grid


def save_grid(images: np.ndarray, path: str, upscale: int = 1) -> None:
    """Writes a PNG grid of uint8 images `[N,H,W,C]`."""
    grid = image_grid(images)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
