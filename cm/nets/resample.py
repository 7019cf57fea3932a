"""FIR up/down-sampling (StyleGAN2's upfirdn) for NHWC images, and NCSN++'s resampling layers.

Pure functions implement zero-stuff -> pad -> FIR filter -> decimate with one convolution;
`Conv2d`, `Upsample` and `Downsample` are the parameterised layers built on them.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")


def fir_kernel(taps: Sequence[float], gain: float = 1.0) -> np.ndarray:
    """2-D FIR filter: outer product of 1-D `taps`, normalised so that its entries sum to `gain`.

    Args:
        taps: separable 1-D filter taps, e.g. (1, 3, 3, 1).
        gain: sum of the returned filter (a constant image is scaled by `gain`).

    Returns:
        float32 array [K, K].
    """
    k = np.asarray(taps, dtype=np.float64)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    return (k * (gain / k.sum())).astype(np.float32)


def upfirdn2d(
    x: jax.Array, kernel: np.ndarray, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> jax.Array:
    """Upsample by zero-stuffing, zero-pad, convolve with `kernel`, keep every `down`-th pixel.

    Same semantics as StyleGAN2's `upfirdn_2d` (zeros are inserted after every input pixel,
    then `pad` is applied on both spatial axes). Channels are folded into the batch and the
    filter runs as one single-channel convolution whose `lhs_dilation` inserts the zeros and
    whose stride decimates: on an H200 this was 3x faster (forward + backward) than a
    depthwise convolution (`feature_group_count=C`) or two separable 1-D passes.

    Args:
        x: [B, H, W, C] images.
        kernel: [K, K] FIR filter (true convolution, i.e. flipped before correlating).
        up: zero-stuffing factor.
        down: decimation factor.
        pad: (before, after) zero padding of the zero-stuffed image; both >= 0.

    Returns:
        [B, (H*up + pad0 + pad1 - K) // down + 1, ..., C] in x.dtype.
    """
    pad0, pad1 = pad
    if pad0 < 0 or pad1 < 0:
        raise ValueError(f"negative padding (cropping) is not supported: {pad}")
    b, h, w, c = x.shape
    y = jnp.transpose(x, (0, 3, 1, 2)).reshape(b * c, h, w, 1)  # [B*C, H, W, 1]
    k = jnp.asarray(kernel[::-1, ::-1], dtype=x.dtype)[:, :, None, None]  # lax correlates
    # lhs_dilation leaves no zeros after the last pixel; `up - 1` extra padding restores them.
    padding = ((pad0, pad1 + up - 1), (pad0, pad1 + up - 1))
    y = jax.lax.conv_general_dilated(
        y, k, (down, down), padding, lhs_dilation=(up, up), dimension_numbers=_DN
    )  # [B*C, H', W', 1]
    return jnp.transpose(y.reshape(b, c, y.shape[1], y.shape[2]), (0, 2, 3, 1))


def upsample_2d(x: jax.Array, taps: Sequence[float], factor: int = 2) -> jax.Array:
    """FIR upsampling [B, H, W, C] -> [B, factor*H, factor*W, C]; constant images stay constant
    away from the border (zero padding outside the image)."""
    k = fir_kernel(taps, gain=factor**2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: jax.Array, taps: Sequence[float], factor: int = 2) -> jax.Array:
    """FIR downsampling (low-pass, then decimate) [B, H, W, C] -> [B, H/factor, W/factor, C]."""
    k = fir_kernel(taps)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling [B, H, W, C] -> [B, factor*H, factor*W, C]."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Average pooling over factor x factor blocks [B, H, W, C] -> [B, H/factor, W/factor, C]."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample_conv_2d(
    x: jax.Array, w: jax.Array, taps: Sequence[float], factor: int = 2
) -> jax.Array:
    """Fused zero-stuff + conv with `w` + FIR filter (StyleGAN2 `upsample_conv_2d`).

    Args:
        x: [B, H, W, Cin].
        w: [k, k, Cin, Cout] conv kernel (k odd).

    Returns:
        [B, factor*H, factor*W, Cout].
    """
    kw = w.shape[0]
    # Transposed conv: the dilated input is correlated with w over its full support,
    # giving [B, (H-1)*factor + kw, ...].
    y = jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(1, 1),
        padding=((kw - 1, kw - 1), (kw - 1, kw - 1)),
        lhs_dilation=(factor, factor),
        dimension_numbers=_DN,
    )
    k = fir_kernel(taps, gain=factor**2)
    p = (k.shape[0] - factor) - (kw - 1)
    return upfirdn2d(y, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: jax.Array, w: jax.Array, taps: Sequence[float], factor: int = 2
) -> jax.Array:
    """Fused FIR filter + strided conv with `w` (StyleGAN2 `conv_downsample_2d`).

    Args:
        x: [B, H, W, Cin].
        w: [k, k, Cin, Cout] conv kernel (k odd).

    Returns:
        [B, H/factor, W/factor, Cout].
    """
    kw = w.shape[0]
    k = fir_kernel(taps)
    p = (k.shape[0] - factor) + (kw - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(factor, factor), padding="VALID", dimension_numbers=_DN
    )


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM initialiser: uniform variance scaling, fan_avg.

    `scale == 0` becomes 1e-10 (as in the original code) so that "zero-initialised" layers are
    tiny but not exactly zero; jax's variance_scaling also rejects a non-positive scale.
    """
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


class Conv2d(nn.Module):
    """Conv with optional fused FIR up/downsampling by 2 (params `weight` [k,k,Cin,Cout], `bias`).

    The class name matches the OpenAI JAX code so the parameter trees line up.
    """

    features: int
    kernel_size: int = 3
    up: bool = False
    down: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up and self.down:
            raise ValueError("Conv2d: up and down are exclusive")
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        w = self.param("weight", default_init(), shape).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.up:
            x = upsample_conv_2d(x, w, self.fir_kernel)
        elif self.down:
            x = conv_downsample_2d(x, w, self.fir_kernel)
        else:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return x + b.astype(self.dtype)


class Upsample(nn.Module):
    """2x upsampling: FIR or nearest, optionally with a 3x3 conv to `out_ch` channels."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        out_ch = self.out_ch or c
        if self.fir:
            if self.with_conv:
                y = Conv2d(out_ch, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
            else:
                y = upsample_2d(x, self.fir_kernel)
        else:
            y = naive_upsample_2d(x)
            if self.with_conv:
                y = nn.Conv(out_ch, (3, 3), kernel_init=default_init(), dtype=self.dtype)(y)
        assert y.shape == (b, 2 * h, 2 * w, out_ch), y.shape
        return y


class Downsample(nn.Module):
    """2x downsampling: FIR or average pooling / strided conv, optionally to `out_ch` channels."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        out_ch = self.out_ch or c
        if self.fir:
            if self.with_conv:
                y = Conv2d(out_ch, down=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
            else:
                y = downsample_2d(x, self.fir_kernel)
        elif self.with_conv:
            y = nn.Conv(
                out_ch, (3, 3), strides=(2, 2), kernel_init=default_init(), dtype=self.dtype
            )(x)
        else:
            y = naive_downsample_2d(x)
        assert y.shape == (b, h // 2, w // 2, out_ch), y.shape
        return y
