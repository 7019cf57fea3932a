"""Building blocks of NCSN++ (Song et al. 2021): conv helpers, embeddings, attention, res blocks.

Class names follow the OpenAI consistency-model JAX code so the parameter trees line up with
its checkpoints. Parameters are float32; `dtype` sets the activation/matmul precision.
"""

import functools
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm.nets import resample
from cm.nets.resample import default_init

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def conv3x3(
    x: jax.Array,
    features: int,
    *,
    stride: int = 1,
    init_scale: float = 1.0,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """3x3 'SAME' conv with DDPM init and zero bias, created in the caller's compact scope."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        kernel_init=default_init(init_scale),
        dtype=dtype,
    )(x)


def conv1x1(
    x: jax.Array, features: int, *, init_scale: float = 1.0, dtype: Any = jnp.float32
) -> jax.Array:
    """1x1 conv with DDPM init and zero bias, created in the caller's compact scope."""
    return nn.Conv(features, (1, 1), kernel_init=default_init(init_scale), dtype=dtype)(x)


def group_norm(x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """GroupNorm with min(C // 4, 32) groups (statistics in float32), in the caller's scope."""
    return nn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32), dtype=dtype)(x)


class NIN(nn.Module):
    """Per-pixel linear map ("network in network"): params `W` [Cin, Cout] and `b` [Cout]."""

    num_units: int
    init_scale: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), w.astype(self.dtype))
        return y + b.astype(self.dtype)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2 pi W t), cos(2 pi W t)] with W ~ N(0, scale^2), frozen.

    W is stored as a parameter (`W`, [embedding_size]) but receives no gradient.
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:  # [B] -> [B, 2 * embedding_size]
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        w = jax.lax.stop_gradient(w)
        # float32 on purpose: sin/cos of arguments up to ~100 rad need the mantissa.
        proj = 2.0 * jnp.pi * t.astype(jnp.float32)[:, None] * w[None, :]
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Transformer sinusoidal embedding of a (real-valued) timestep, as in DDPM.

    Frequencies are max_period^(-i / (dim/2 - 1)), i = 0..dim/2-1 (DDPM's spacing: the last
    frequency is exactly 1/max_period).

    Args:
        t: [B] timesteps.
        dim: embedding width (odd widths are zero-padded).

    Returns:
        [B, dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Combine(nn.Module):
    """Merges a skip input `x` into `y`: 1x1 conv of x to y's width, then sum or concat."""

    method: str = "cat"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        h = conv1x1(x, y.shape[-1], dtype=self.dtype)
        if self.method == "cat":
            return jnp.concatenate([h, y], axis=-1)
        if self.method == "sum":
            return h + y
        raise ValueError(f"unknown combine method {self.method!r}")


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all H*W positions, residual (optionally / sqrt 2)."""

    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> same
        b, h, w, c = x.shape
        y = group_norm(x, self.dtype)
        q = NIN(c, dtype=self.dtype)(y).reshape(b, h * w, c)
        k = NIN(c, dtype=self.dtype)(y).reshape(b, h * w, c)
        v = NIN(c, dtype=self.dtype)(y).reshape(b, h * w, c)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c**-0.5)  # [B, HW, HW]
        # Softmax in float32 so bfloat16 runs keep a normalised attention distribution.
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bqk,bkc->bqc", attn, v).reshape(b, h, w, c)
        y = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(y)
        return (x + y) * _INV_SQRT2 if self.skip_rescale else x + y


def _add_temb(h: jax.Array, temb: jax.Array | None, act: Any, dtype: Any) -> jax.Array:
    """Adds a per-channel bias projected from the (shared) time embedding."""
    if temb is None:
        return h
    bias = nn.Dense(h.shape[-1], kernel_init=default_init(), dtype=dtype)(act(temb))
    return h + bias[:, None, None, :]  # [B, 1, 1, C]


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block: GN-act-conv, + time bias, GN-act-dropout-conv, NIN shortcut."""

    act: Any = nn.swish
    out_ch: int | None = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:  # [B, H, W, C] -> [B, H, W, out_ch]
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = conv3x3(self.act(group_norm(x, self.dtype)), out_ch, dtype=self.dtype)
        h = _add_temb(h, temb, self.act, self.dtype)
        h = self.act(group_norm(h, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
        if c != out_ch:
            if self.conv_shortcut:
                x = conv3x3(x, out_ch, dtype=self.dtype)
            else:
                x = NIN(out_ch, dtype=self.dtype)(x)
        return (x + h) * _INV_SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block; `up`/`down` resample both branches by 2 (FIR or naive)."""

    act: Any = nn.swish
    up: bool = False
    down: bool = False
    out_ch: int | None = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Any = jnp.float32

    def _resample(self, x: jax.Array) -> jax.Array:
        if self.up:
            if self.fir:
                return resample.upsample_2d(x, self.fir_kernel)
            return resample.naive_upsample_2d(x)
        if self.down:
            if self.fir:
                return resample.downsample_2d(x, self.fir_kernel)
            return resample.naive_downsample_2d(x)
        return x

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:  # [B, H, W, C] -> [B, H', W', out_ch], H' = 2H (up), H/2 (down) or H
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = self.act(group_norm(x, self.dtype))
        h = self._resample(h)
        x = self._resample(x)
        h = conv3x3(h, out_ch, dtype=self.dtype)
        h = _add_temb(h, temb, self.act, self.dtype)
        h = self.act(group_norm(h, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
        if c != out_ch or self.up or self.down:
            x = conv1x1(x, out_ch, dtype=self.dtype)
        return (x + h) * _INV_SQRT2 if self.skip_rescale else x + h


@functools.cache
def rematerialized(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` whose activations are recomputed in the backward pass (`nn.remat`), under the
    same name, so that its parameters keep their names (a checkpoint trained with remat
    on restores with it off and back). `__call__(x, temb, train)`: `train` is static."""
    static = (3,) if "train" in inspect.signature(cls.__call__).parameters else ()
    wrapped = nn.remat(cls, static_argnums=static)
    wrapped.__name__ = wrapped.__qualname__ = cls.__name__
    return wrapped


def block(cls: type[nn.Module], remat: bool) -> type[nn.Module]:
    """`cls`, or its rematerialized version (`model.remat`)."""
    return rematerialized(cls) if remat else cls
