"""Builds the network F_theta from the config and adapts it to the `ApplyFn` shape.

Networks are looked up by name (`model.name`) in `MODELS`. The SD autoencoder of latent
training is `load_autoencoder` (`cm.nets.autoencoder`).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cm.nets import ddpm_unet, ncsnpp
from cm.nets.autoencoder import load_autoencoder as load_autoencoder

PyTree = Any


def _build_ncsnpp(config: ml_collections.ConfigDict) -> nn.Module:
    size, _, channels = net_shape(config)
    cfg = ncsnpp.NCSNppConfig.from_config(config.model, size, channels)
    return ncsnpp.NCSNpp(config=cfg)


MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "ncsnpp": _build_ncsnpp,
    "ddpm_unet": ddpm_unet.build,  # DDPM's CIFAR-10 U-Net (cm.loss=ddpm configs)
}


def net_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of the network's inputs: `cm.config.Config.net_shape` (latents in latent
    training), or the data's for a raw `ConfigDict`."""
    if hasattr(config, "net_shape"):
        return config.net_shape
    s, c = config.data.image_size, config.data.num_channels
    return (s, s, c)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](config)


def make_apply_fn(module: nn.Module):
    """`apply_fn(params, x_in, t_cond, labels, train, dropout_key) -> [B,H,W,C]`."""

    def apply_fn(params, x_in, t_cond, labels, train, dropout_key):
        rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else {}
        return module.apply({"params": params}, x_in, t_cond, labels, train=train, rngs=rngs)

    return apply_fn


def init_params(module: nn.Module, key: jax.Array, config: ml_collections.ConfigDict) -> PyTree:
    """Initial parameters for one example of the configured image shape."""
    x = jnp.zeros((1, *net_shape(config)), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if config.model.num_classes > 0 else None
    return module.init({"params": key}, x, t, labels, train=False)["params"]


def count_params(params: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
