"""The DDPM U-Net (Ho et al. 2020, Appendix B), `model.name=ddpm_unet`, eps_theta(x_t, t).

Built from NCSN++'s own blocks (`cm.layers`): DDPM residual blocks (GroupNorm, swish,
3x3 convs, a per-channel bias from the time embedding, dropout, NIN shortcut), single-head
self-attention, strided-conv down- and nearest+conv up-sampling, the sinusoidal timestep
embedding and its two-layer MLP. One thing differs from NCSN++ with DDPM blocks, which is
why this is a module of its own: the decoder attends after *every* residual block at an
attention resolution (three times per level), as the original does, where NCSN++ attends
once per level. On CIFAR-10 (ch 128, ch_mult (1,2,2,2), 2 blocks, attention at 16x16)
this gives 35,746,307 parameters, the published 35.7 M; NCSN++ configured alike has
35,218,947 (two 256-channel attention blocks, 263,680 parameters each, fewer).

Time input: `t_cond` is the integer timestep t in 0..T-1 as float32, embedded as is by
`layers.timestep_embedding` (DDPM's sinusoids: frequencies 10000^(-i / (ch/2 - 1))).
Initialisation follows score_sde's port of DDPM (zero-initialised last conv of each
block, attention output and final conv; NIN layers at scale 0.1).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cm.nets import layers
from cm.nets.resample import Downsample, Upsample

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The `model` fields the DDPM U-Net reads (the NCSN++-only ones are ignored)."""

    image_size: int = 32
    num_channels: int = 3
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_classes: int = 0
    dtype: str = "float32"
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; expected one of {tuple(_DTYPES)}")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"image_size {self.image_size} not divisible by "
                             f"2^{len(self.ch_mult) - 1}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "UNetConfig":
        m = config.model
        size, _, channels = getattr(config, "net_shape", None) or (
            config.data.image_size, config.data.image_size, config.data.num_channels)
        return cls(image_size=size, num_channels=channels,
                   nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                   attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
                   resamp_with_conv=m.resamp_with_conv, num_classes=m.num_classes,
                   dtype=m.dtype, remat=m.remat)


class DDPMUNet(nn.Module):
    """eps_theta: `(x_t [B,H,W,C], t [B], labels [B] | None, train) -> [B,H,W,C]`."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t_cond: jax.Array, labels: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        cfg = self.config
        dtype: Any = _DTYPES[cfg.dtype]
        act, nf = nn.swish, cfg.nf
        if x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"input shape {x.shape} does not match config")

        temb = layers.timestep_embedding(t_cond, nf)  # [B, nf]
        dense = lambda v: nn.Dense(4 * nf, kernel_init=layers.default_init(), dtype=dtype)(v)  # noqa: E731
        temb = dense(act(dense(temb)))  # [B, 4 nf]
        if cfg.num_classes > 0:  # as in NCSN++ (not in the original)
            if labels is None:
                raise ValueError("labels are required when num_classes > 0")
            temb = temb + nn.Embed(cfg.num_classes, 4 * nf,
                                   embedding_init=nn.initializers.normal(1.0), dtype=dtype)(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional model (num_classes == 0)")

        def res_block(h, out_ch):
            return layers.block(layers.ResnetBlockDDPMpp, cfg.remat)(
                act=act, out_ch=out_ch, dropout=cfg.dropout, skip_rescale=False,
                init_scale=0.0, dtype=dtype)(h, temb, train)

        def attend(h):
            if h.shape[1] in cfg.attn_resolutions:
                return layers.block(layers.AttnBlockpp, cfg.remat)(
                    skip_rescale=False, init_scale=0.0, dtype=dtype)(h)
            return h

        hs = [layers.conv3x3(x.astype(dtype), nf, dtype=dtype)]  # [B, H, W, nf]
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                hs.append(attend(res_block(hs[-1], nf * mult)))
            if level != len(cfg.ch_mult) - 1:
                hs.append(Downsample(with_conv=cfg.resamp_with_conv, dtype=dtype)(hs[-1]))

        h = hs[-1]
        h = res_block(h, h.shape[-1])
        h = layers.block(layers.AttnBlockpp, cfg.remat)(skip_rescale=False, init_scale=0.0,
                                                         dtype=dtype)(h)
        h = res_block(h, h.shape[-1])

        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                h = attend(res_block(jnp.concatenate([h, hs.pop()], axis=-1), nf * mult))
            if level != 0:
                h = Upsample(with_conv=cfg.resamp_with_conv, dtype=dtype)(h)
        assert not hs

        h = act(layers.group_norm(h, dtype))
        h = layers.conv3x3(h, x.shape[-1], init_scale=0.0, dtype=dtype)
        return h.astype(jnp.float32)  # [B, H, W, C]


def build(config: ml_collections.ConfigDict) -> nn.Module:
    return DDPMUNet(config=UNetConfig.from_config(config))
