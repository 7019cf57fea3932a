"""Samplers as jitted programs over the mesh, and image grids.

What a sampler computes is its objective's (`cm.objectives`: `Objective.sampling` gives a
`Sampler` by name); here it becomes one jitted program per sampler, sharded over the
('data',) mesh, returning uint8 images.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from cm.objectives import Sampler
from cm.objectives.spec import ApplyFn
from cm.runtime.views import CMConfig


def make_sampler(apply_fn: ApplyFn, cfg: CMConfig, mesh: Mesh,
                 image_shape: tuple[int, int, int], spec: Sampler, num_classes: int = 0,
                 decoder=None):
    """Jitted `sampler(params, key, batch_size, labels=None) -> uint8 [B,H,W,C]` over the mesh.

    `spec` is the objective's sampler (e.g. `1step`, `heun18`, `dopri5`). For a
    class-conditional model (`num_classes > 0`) `labels` `[B]` picks the classes; without
    it the classes are drawn uniformly from `key` (what class-conditional FID against the
    whole training set needs). `sampler.with_nfe(...)` returns `(images, network calls
    per image)`: the spec's count, or, for an adaptive sampler (`spec.nfe` None), the
    count of this batch. `decoder` = (decode(variables, x) -> images in [-1, 1], its
    variables): latent training's autoencoder, applied to the samples in the same program
    (its variables an argument, not constants baked into it).
    """
    sample_fn = spec.sample
    out_sharding = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))

    decode, dec_vars = decoder if decoder is not None else (None, None)

    @functools.partial(jax.jit, static_argnums=(2,), out_shardings=out_sharding)
    def _run(params, key, batch_size, labels, dec_vars):
        if num_classes > 0 and labels is None:
            key, label_key = jax.random.split(key)
            labels = jax.random.randint(label_key, (batch_size,), 0, num_classes)
        out = sample_fn(apply_fn, params, cfg, key, (batch_size,) + image_shape, labels)
        x, nfe = out if spec.nfe is None else (out, spec.nfe)
        # The samplers return their end point unclipped: images are clipped here, latents
        # go to the decoder as they are (they are not bounded; the decoder clips pixels).
        x = decode(dec_vars, x) if decode is not None else jnp.clip(x, -1.0, 1.0)
        images = jnp.round((x + 1.0) * 127.5).astype(jnp.uint8)
        return images, jnp.asarray(nfe, jnp.float32)

    def with_nfe(params, key, batch_size: int, labels=None):
        if labels is not None:
            if num_classes <= 0:
                raise ValueError("labels given to an unconditional model")
            labels = jnp.asarray(labels, jnp.int32)
        return _run(params, key, batch_size, labels, dec_vars)

    def sampler(params, key, batch_size: int, labels=None):
        return with_nfe(params, key, batch_size, labels)[0]

    sampler.with_nfe = with_nfe
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
