"""NCSN++ (Song et al. 2021), the U-Net F_theta of the OpenAI CIFAR-10 consistency-model code.

`NCSNppConfig` is built from the config's `model` section; `NCSNpp` maps
(c_in * x, 0.25 * ln sigma, labels) to an output of the image's shape.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm.nets import layers
from cm.nets.resample import Downsample, Upsample

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CHOICES = {
    "resblock_type": ("biggan", "ddpm"),
    "embedding_type": ("fourier", "positional"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "dtype": tuple(_DTYPES),
}


@dataclasses.dataclass(frozen=True)
class NCSNppConfig:
    """Architecture of NCSN++; field names match the config's `model` section."""

    image_size: int = 32
    num_channels: int = 3
    nf: int = 128
    ch_mult: tuple[int, ...] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resblock_type: str = "biggan"
    resamp_with_conv: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    num_classes: int = 0
    dtype: str = "float32"
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"image_size {self.image_size} not divisible by 2^{len(self.ch_mult) - 1}"
            )

    @classmethod
    def from_config(cls, model_cfg: Any, image_size: int, num_channels: int) -> "NCSNppConfig":
        """Reads the `model` section of the experiment config (a ConfigDict or mapping)."""
        get = model_cfg.__getitem__
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in ("image_size", "num_channels"):
                continue
            value = get(f.name)
            if isinstance(value, list | tuple):
                value = tuple(value)
            elif isinstance(value, str):
                value = value.lower()
            kwargs[f.name] = value
        return cls(image_size=image_size, num_channels=num_channels, **kwargs)

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]


class NCSNpp(nn.Module):
    """NCSN++ U-Net (always noise-conditional, swish, GroupNorm).

    Time input: `t_cond` is used as is, with no further scaling. The consistency-model caller
    passes 0.25 * ln(sigma), exactly what openai/consistency_models_cifar10 feeds its NCSN++
    (`cond_t = 0.25 * jnp.log(t)`) for both embedding types. With the Fourier embedding this
    equals the original; score_sde instead feeds ln(sigma), a 4x wider input scale. With the
    positional embedding the original also feeds 0.25 * ln(sigma) (inputs in about
    [-1.6, 1.1], so most sinusoids are near constant); the PyTorch consistency-model U-Net feeds
    1000 * 0.25 * ln(sigma) instead. We keep the CIFAR-10 JAX behaviour; a caller wanting the
    PyTorch convention can scale t_cond itself.

    Class conditioning (not in the original): with `num_classes > 0`, a learned embedding of
    `labels` is added to the time embedding after its MLP (as in guided-diffusion's U-Net).
    """

    config: NCSNppConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t_cond: jax.Array,
        labels: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Applies the network.

        Args:
            x: [B, H, W, C] float32 input (already scaled by c_in).
            t_cond: [B] float32 time input, 0.25 * ln(sigma).
            labels: [B] int32 class labels; required iff config.num_classes > 0.
            train: enables dropout (needs the 'dropout' rng collection when dropout > 0).

        Returns:
            [B, H, W, C] float32.
        """
        cfg = self.config
        dtype = cfg.compute_dtype
        act = nn.swish
        nf = cfg.nf
        num_levels = len(cfg.ch_mult)
        if x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"input shape {x.shape} does not match config")

        # Time (and label) embedding: [B, 4 * nf].
        if cfg.embedding_type == "fourier":
            temb = layers.GaussianFourierProjection(nf, cfg.fourier_scale)(t_cond)
        else:
            temb = layers.timestep_embedding(t_cond, nf)
        dense = lambda v: nn.Dense(4 * nf, kernel_init=layers.default_init(), dtype=dtype)(v)
        temb = dense(act(dense(temb)))
        if cfg.num_classes > 0:
            if labels is None:
                raise ValueError("labels are required when num_classes > 0")
            # N(0, 1) rows: the same scale as the time embedding after its MLP.
            embed = nn.Embed(
                cfg.num_classes, 4 * nf, embedding_init=nn.initializers.normal(1.0), dtype=dtype
            )
            temb = temb + embed(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional model (num_classes == 0)")

        fir = dict(fir=cfg.fir, fir_kernel=cfg.fir_kernel, dtype=dtype)
        attn_block = lambda: layers.block(layers.AttnBlockpp, cfg.remat)(
            cfg.skip_rescale, cfg.init_scale, dtype=dtype)
        if cfg.resblock_type == "biggan":
            res_block = lambda **kw: layers.block(layers.ResnetBlockBigGANpp, cfg.remat)(
                act=act,
                dropout=cfg.dropout,
                skip_rescale=cfg.skip_rescale,
                init_scale=cfg.init_scale,
                **fir,
                **kw,
            )
        else:
            res_block = lambda **kw: layers.block(layers.ResnetBlockDDPMpp, cfg.remat)(
                act=act,
                dropout=cfg.dropout,
                skip_rescale=cfg.skip_rescale,
                init_scale=cfg.init_scale,
                dtype=dtype,
                **kw,
            )
        # Sum of two unit-variance branches, rescaled like the residual blocks.
        merge = lambda a, b: (a + b) * (1.0 / math.sqrt(2.0)) if cfg.skip_rescale else a + b

        x = x.astype(dtype)
        pyramid_in = x if cfg.progressive_input != "none" else None

        # Encoder.
        hs = [layers.conv3x3(x, nf, dtype=dtype)]  # [B, H, W, nf]
        for level in range(num_levels):
            for _ in range(cfg.num_res_blocks):
                h = res_block(out_ch=nf * cfg.ch_mult[level])(hs[-1], temb, train)
                if h.shape[1] in cfg.attn_resolutions:
                    h = attn_block()(h)
                hs.append(h)
            if level == num_levels - 1:
                continue
            if cfg.resblock_type == "ddpm":
                h = Downsample(with_conv=cfg.resamp_with_conv, **fir)(hs[-1])
            else:
                h = res_block(down=True)(hs[-1], temb, train)
            if cfg.progressive_input == "input_skip":
                pyramid_in = Downsample(with_conv=False, **fir)(pyramid_in)
                h = layers.Combine(cfg.progressive_combine, dtype=dtype)(pyramid_in, h)
            elif cfg.progressive_input == "residual":
                pyramid_in = Downsample(out_ch=h.shape[-1], with_conv=True, **fir)(pyramid_in)
                h = pyramid_in = merge(pyramid_in, h)
            hs.append(h)

        # Middle.
        h = hs[-1]
        h = res_block()(h, temb, train)
        h = attn_block()(h)
        h = res_block()(h, temb, train)

        # Decoder.
        norm_act = lambda v: act(layers.group_norm(v, dtype))
        pyramid = None
        for level in reversed(range(num_levels)):
            for _ in range(cfg.num_res_blocks + 1):
                skip = hs.pop()
                h = res_block(out_ch=nf * cfg.ch_mult[level])(
                    jnp.concatenate([h, skip], axis=-1), temb, train
                )
            if h.shape[1] in cfg.attn_resolutions:
                h = attn_block()(h)

            if cfg.progressive == "output_skip":
                out = layers.conv3x3(
                    norm_act(h), x.shape[-1], init_scale=cfg.init_scale, dtype=dtype
                )
                if pyramid is None:
                    pyramid = out
                else:
                    pyramid = Upsample(with_conv=False, **fir)(pyramid) + out
            elif cfg.progressive == "residual":
                if pyramid is None:
                    pyramid = layers.conv3x3(norm_act(h), h.shape[-1], dtype=dtype)
                else:
                    pyramid = Upsample(out_ch=h.shape[-1], with_conv=True, **fir)(pyramid)
                    h = pyramid = merge(pyramid, h)

            if level != 0:
                if cfg.resblock_type == "ddpm":
                    h = Upsample(with_conv=cfg.resamp_with_conv, **fir)(h)
                else:
                    h = res_block(up=True)(h, temb, train)
        assert not hs

        if cfg.progressive == "output_skip":
            h = pyramid
        else:
            h = layers.conv3x3(norm_act(h), x.shape[-1], init_scale=cfg.init_scale, dtype=dtype)
        return h.astype(jnp.float32)  # [B, H, W, C]


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or `jax.ShapeDtypeStruct`s)."""
    return int(sum(np.prod(p.shape, dtype=np.int64) for p in jax.tree_util.tree_leaves(params)))
