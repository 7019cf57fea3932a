"""Latent training: the autoencoder of a run, `--mode encode`, and the store as a dataset.

`latent.autoencoder` names the autoencoder (a folder in diffusers' layout, a hub id such
as `stabilityai/sd-vae-ft-mse`, or the workdir of a `--mode train_ae` run, whose
`autoencoder/` folder is in that layout). `--mode encode` encodes `data` once into the
latent store (`cm.data.latents`); training reads the store instead of the images, after
checking it was made by this autoencoder from this data; samples are decoded by the same
autoencoder before grids and evaluation.

The store holds the posterior **mean** by default (`latent.posterior=mean`): a store can
hold one draw per image, and a fixed draw is the mean plus noise without the fresh draw
each epoch that online encoders (the authors' SD code, `latent_dist.sample()`) get; the
decoder reconstructs the mean best. `sample` stores one seeded draw. With
`data.random_flip` the mirrored images are encoded too (a latent mirrored is not the
latent of the mirrored image), so a flipped row trains on its own encoding.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cm import config as config_lib
from cm import data
from cm.data import latents
from cm.nets.autoencoder import Autoencoder, load_autoencoder

AE_FOLDER = "autoencoder"  # a --mode train_ae workdir's diffusers-layout folder
_SAMPLE_STREAM = 0x4C41  # "LA": the posterior draws of a `sample` store


def autoencoder_source(name: str) -> str:
    """A --mode train_ae workdir becomes its autoencoder folder; anything else as given."""
    inner = os.path.join(os.path.expanduser(name), AE_FOLDER)
    return inner if os.path.isfile(os.path.join(inner, "config.json")) else name


@functools.lru_cache(maxsize=2)
def _load(source: str, factor: int, channels: int) -> Autoencoder:
    ae = load_autoencoder(autoencoder_source(source))
    if (ae.downsample_factor, ae.latent_channels) != (factor, channels):
        raise config_lib.ConfigError(
            f"latent.autoencoder={source!r} downsamples by {ae.downsample_factor} into "
            f"{ae.latent_channels} channels, but latent.factor={factor} and latent.channels="
            f"{channels}: set those to its values")
    logging.info("autoencoder %s: factor %d, %d latent channels, scaling factor %.6g, "
                 "sha256 %s", source, ae.downsample_factor, ae.latent_channels,
                 ae.scaling_factor, ae.digest[:16])
    return ae


def autoencoder(cfg: config_lib.Config) -> Autoencoder:
    """The run's autoencoder (loaded once per process), checked against latent.factor and
    latent.channels."""
    lt = cfg.latent
    return _load(lt.autoencoder, lt.factor, lt.channels)


def store_dir(cfg: config_lib.Config, run_dir: str) -> str:
    return os.path.expanduser(cfg.latent.store) or os.path.join(run_dir, "latents")


def _manifest(cfg: config_lib.Config, ae: Autoencoder) -> dict:
    return {"autoencoder": cfg.latent.autoencoder, "autoencoder_sha256": ae.digest,
            "scaling_factor": ae.scaling_factor, "posterior": cfg.latent.posterior,
            "seed": cfg.training.seed, "shape": list(cfg.net_shape)}


def encode(config: Any, run_dir: str) -> str:
    """`--mode encode`: the run's dataset encoded into its latent store (resumable).

    Returns:
      The store's folder.
    """
    cfg = config_lib.build(config)
    if not cfg.latent.enabled:
        raise config_lib.ConfigError("--mode encode needs latent.autoencoder (a diffusers "
                                     "folder, a hub id, or a --mode train_ae workdir)")
    ae = autoencoder(cfg)
    images, labels = data.load_dataset(cfg.data)
    scale, sample = ae.scaling_factor, cfg.latent.posterior == "sample"
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.training.seed), _SAMPLE_STREAM)

    def encode_block(block: np.ndarray, first_row: int) -> np.ndarray:
        x = block.astype(np.float32) / 127.5 - 1.0
        out = []
        for lo in range(0, len(x), cfg.latent.encode_batch):
            mean, logvar = ae.encode(x[lo:lo + cfg.latent.encode_batch])
            if sample:
                eps = jax.random.normal(jax.random.fold_in(key, first_row + lo), mean.shape)
                mean = mean + jnp.exp(0.5 * logvar) * eps
            out.append(np.asarray(scale * mean))
        return np.concatenate(out)

    folder = store_dir(cfg, run_dir)
    manifest = {**_manifest(cfg, ae), "data": latents.data_identity(cfg.data, images)}
    logging.info("encoding %d images of %s into %s (%s; %s)", len(images), cfg.data.name,
                 folder, cfg.latent.posterior,
                 "both orientations" if cfg.data.random_flip else "no flips")
    latents.encode_store(folder, images, labels, encode_block, manifest,
                         chunk=4 * cfg.latent.encode_batch, flips=cfg.data.random_flip,
                         log=logging.info)
    logging.info("latent store complete: %s", folder)
    return folder


def training_data(cfg: config_lib.Config, run_dir: str) -> latents.Store:
    """The store a latent run trains on, checked against its autoencoder and data."""
    ae = autoencoder(cfg)
    store = latents.open_store(store_dir(cfg, run_dir), ae.digest, cfg.data)
    if tuple(store.manifest["shape"]) != tuple(cfg.net_shape):
        raise latents.StoreMismatchError(
            f"the store's latents are {tuple(store.manifest['shape'])}, the run's "
            f"{cfg.net_shape}")
    if cfg.data.random_flip and store.flipped is None:
        raise latents.StoreMismatchError("data.random_flip is on but the store holds no "
                                         "mirrored encodings: encode with random_flip on")
    return store


def decoder(cfg: config_lib.Config):
    """(decode(variables, scaled latents) -> images in [-1, 1], jittable; the variables),
    for the samplers of a latent run; None in pixel space."""
    if not cfg.latent.enabled:
        return None
    ae = autoencoder(cfg)
    from cm.nets.autoencoder import AutoencoderKL

    module = AutoencoderKL(ae.config)

    def decode(variables, z):
        x = module.apply(variables, z / ae.scaling_factor, method=AutoencoderKL.decode)
        return jnp.clip(x, -1.0, 1.0)

    return decode, ae.variables
