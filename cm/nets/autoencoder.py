"""The Stable Diffusion autoencoder (diffusers' `AutoencoderKL`) in Flax, NHWC, and its loader.

Architecture (diffusers 0.42 `autoencoders/vae.py`, `unet_2d_blocks.py`, `resnet.py`): every
GroupNorm has `norm_num_groups` groups and eps 1e-6, every activation is SiLU, no dropout.
  * Encoder: conv_in 3x3; per width `block_out_channels[i]` a down block of
    `layers_per_block` ResNet blocks, then (all but the last block) pad right / bottom by 1
    and a 3x3 stride-2 conv; mid block (ResNet, single-head self-attention over the
    positions, ResNet); norm, SiLU, conv_out 3x3 to `2 * latent_channels` (mean, logvar).
  * quant_conv 1x1; logvar clamped to [-30, 20] (the diagonal Gaussian).
  * post_quant_conv 1x1; Decoder: conv_in 3x3, mid block, per reversed width an up block of
    `layers_per_block + 1` ResNet blocks, then (all but the last) nearest x2 and a 3x3 conv;
    norm, SiLU, conv_out 3x3.
Flax names mirror the PyTorch ones with `.N` written `_N` (`down_blocks.0.resnets.1.conv1`
-> `down_blocks_0/resnets_1/conv1`), so `params_from_diffusers` maps names one to one.

    ae = load_autoencoder("stabilityai/sd-vae-ft-mse")   # or a folder in diffusers' layout
    mean, logvar = ae.encode(images)    # [B, H, W, 3] in [-1, 1] -> 2 x [B, H/8, W/8, 4]
    images = ae.decode(latents)         # unscaled latents: the caller applies scaling_factor
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrained import safetensors_io
from pretrained.fetch import DEFAULT_CACHE_DIR, WeightsError

Variables = dict[str, Any]  # {'params': {'encoder': {...}, 'quant_conv': ..., 'decoder': ...}}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
AUTOENCODER_CACHE_DIR = os.path.join(DEFAULT_CACHE_DIR, "autoencoders")

_EPS = 1e-6  # every GroupNorm of the autoencoder, attention's included
_LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
# config.json keys that do not change the computation here (besides diffusers' metadata,
# the keys starting with "_"; `_class_name` is checked).
_IGNORED_KEYS = ("force_upcast",)
# Supported only at diffusers' defaults: other values change the architecture or the
# meaning of the latents beyond `scaling_factor`.
_FIXED_KEYS = {
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Old diffusers attention names (diffusers renames them on load too) -> current ones.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


class AutoencoderWeightsError(WeightsError, ValueError):
    """The tensors do not fit the autoencoder's config (missing, unexpected, wrong shape)."""


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """diffusers' `AutoencoderKL` config; field names and defaults are those of config.json."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        for name, kind in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            if len(types) != n or any(t != kind for t in types):
                raise ValueError(f"{name} must be {n} x {kind!r} (one per block_out_channels "
                                 f"{self.block_out_channels}), got {types}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn {self.act_fn!r} is not supported (only 'silu' / 'swish')")
        sizes = (self.in_channels, self.out_channels, self.latent_channels,
                 self.layers_per_block, self.norm_num_groups, *self.block_out_channels)
        if n == 0 or any(not isinstance(s, int) or s <= 0 for s in sizes):
            raise ValueError(f"channel counts, layers_per_block and norm_num_groups must be "
                             f"positive integers: {self}")
        if any(w % self.norm_num_groups for w in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide every "
                             f"width in block_out_channels {self.block_out_channels}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AutoencoderConfig:
        """From a parsed diffusers config.json; absent keys take diffusers' defaults.

        Raises:
          ValueError: not an AutoencoderKL config, an unknown key, a supported-only-at-default
            key at another value, or an inconsistent architecture.
        """
        if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"_class_name is {data['_class_name']!r}, not 'AutoencoderKL'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
            elif key in _FIXED_KEYS:
                if value != _FIXED_KEYS[key]:
                    raise ValueError(f"{key}={value!r} is not supported (only "
                                     f"{_FIXED_KEYS[key]!r}, diffusers' default)")
            elif key not in _IGNORED_KEYS and not key.startswith("_"):
                raise ValueError(f"unknown AutoencoderKL config key {key!r}")
        return cls(**kwargs)

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: one halving per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)


# Stable Diffusion's autoencoder (sd-vae-ft-mse, SD 1.x / 2.x): 83,653,863 parameters.
SD_CONFIG = AutoencoderConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    sample_size=256,
)


class _Layers(nn.Module):
    """Fields shared by the blocks: GroupNorm groups, compute dtype, matmul precision."""

    groups: int
    dtype: Any = jnp.float32
    precision: Any = None

    def conv(self, features: int, kernel: int, name: str, stride: int = 1) -> nn.Conv:
        """Bias, torch's padding: 1 for 3x3 (VALID after the explicit pad when strided)."""
        pad = "VALID" if kernel == 1 or stride != 1 else ((1, 1), (1, 1))
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                       dtype=self.dtype, precision=self.precision, name=name)

    def norm(self, name: str) -> nn.GroupNorm:
        """GroupNorm as torch's: two-pass variance, statistics in float32 whatever the dtype."""
        return nn.GroupNorm(num_groups=self.groups, epsilon=_EPS, dtype=self.dtype,
                            use_fast_variance=False, name=name)

    def fields(self) -> dict[str, Any]:
        """These fields, to pass on to sub-blocks."""
        return dict(groups=self.groups, dtype=self.dtype, precision=self.precision)


class ResnetBlock(_Layers):
    """diffusers' `ResnetBlock2D` without time embedding: [B, H, W, Cin] -> [B, H, W, features]."""

    features: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(self.features, 3, "conv1")(nn.silu(self.norm("norm1")(x)))
        h = self.conv(self.features, 3, "conv2")(nn.silu(self.norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = self.conv(self.features, 1, "conv_shortcut")(x)
        return x + h


class Attention(_Layers):
    """Single-head self-attention over the H * W positions, with a residual: [B, H, W, C]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        h = self.norm("group_norm")(x).reshape(b, height * width, c)  # [B, N, C]
        dense = lambda name: nn.Dense(c, dtype=self.dtype, precision=self.precision, name=name)
        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)  # [B, N, C] each
        scores = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision) / math.sqrt(c)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # upcast_softmax
        out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v, precision=self.precision)
        return x + dense("to_out_0")(out).reshape(b, height, width, c)


class MidBlock(_Layers):
    """diffusers' `UNetMidBlock2D`: ResNet, attention, ResNet at constant width."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(**self.fields(), features=x.shape[-1], name="resnets_0")(x)
        x = Attention(**self.fields(), name="attentions_0")(x)
        return ResnetBlock(**self.fields(), features=x.shape[-1], name="resnets_1")(x)


class Resample(_Layers):
    """`Downsample2D` (pad right / bottom, 3x3 stride 2) or `Upsample2D` (nearest x2, 3x3)."""

    up: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up:  # [B, H, W, C] -> [B, 2H, 2W, C]
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return self.conv(x.shape[-1], 3, "conv")(x)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # -> [B, H/2, W/2, C] after the conv
        return self.conv(x.shape[-1], 3, "conv", stride=2)(x)


class Block(_Layers):
    """A down block (`DownEncoderBlock2D`) or an up block (`UpDecoderBlock2D`)."""

    features: int = 0
    num_layers: int = 1
    resample: bool = False
    up: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(**self.fields(), features=self.features, name=f"resnets_{j}")(x)
        if self.resample:
            name = "upsamplers_0" if self.up else "downsamplers_0"
            x = Resample(**self.fields(), up=self.up, name=name)(x)
        return x


class Coder(_Layers):
    """The encoder ([B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels]) or, with
    `decoder`, the decoder ([B, h, w, latent_channels] -> [B, h * f, w * f, out_channels])."""

    config: AutoencoderConfig | None = None
    decoder: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        widths = cfg.block_out_channels[::-1] if self.decoder else cfg.block_out_channels
        x = self.conv(widths[0], 3, "conv_in")(x)
        if self.decoder:
            x = MidBlock(**self.fields(), name="mid_block")(x)
        for i, width in enumerate(widths):
            name = f"up_blocks_{i}" if self.decoder else f"down_blocks_{i}"
            x = Block(**self.fields(), features=width, resample=i != len(widths) - 1,
                      num_layers=cfg.layers_per_block + self.decoder, up=self.decoder,
                      name=name)(x)
        if not self.decoder:
            x = MidBlock(**self.fields(), name="mid_block")(x)
        out = cfg.out_channels if self.decoder else 2 * cfg.latent_channels
        return self.conv(out, 3, "conv_out")(nn.silu(self.norm("conv_norm_out")(x)))


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL`: `encode` (mean, logvar) and `decode`; float32 outputs.

    Attributes:
      config: the architecture.
      dtype: compute dtype of convs and linears (parameters and norm statistics float32).
      precision: of convs and matmuls; None is the backend's default.
    """

    config: AutoencoderConfig
    dtype: Any = jnp.float32
    precision: Any = None

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, precision=self.precision)
        self.encoder = Coder(cfg.norm_num_groups, **kw, config=cfg)
        self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), **kw)
        self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), **kw)
        self.decoder = Coder(cfg.norm_num_groups, **kw, config=cfg, decoder=True)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, in_channels] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> [B, h * f, w * f, out_channels]."""
        return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (diffusers' `sample_posterior=False`)."""
        return self.decode(self.encode(images)[0])


# ---------------------------------------------------------------------------------------
# diffusers state dict -> Flax parameters.


def expected_shapes(config: AutoencoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape, in sorted path order (abstract: nothing is computed)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    tree = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _flax_path(key: str) -> tuple[str, ...]:
    """`encoder.mid_block.attentions.0.query.weight` -> (..., 'attentions_0', 'to_q', 'weight')."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        elif out and out[-1].startswith("attentions_") and part in _OLD_ATTENTION:
            out.append(_OLD_ATTENTION[part])
        else:
            out.append(part)
    return tuple(out)


def _torch_name(path: tuple[str, ...]) -> str:
    """The inverse of `_flax_path` (current names), for messages."""
    *mods, leaf = path
    mods = [re.sub(r"_(\d+)$", r".\1", m) for m in mods]
    return ".".join([*mods, "bias" if leaf == "bias" else "weight"])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax parameter's shape in PyTorch's layout: conv HWIO -> OIHW, dense transposed."""
    if path[-1] != "kernel":
        return shape
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray | None:
    """A PyTorch weight in Flax's layout, or None if its shape does not fit."""
    if len(flax_shape) == 4 and value.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
        value = value.transpose(2, 3, 1, 0)
    elif len(flax_shape) == 2 and value.ndim == 2:  # linear [out, in] -> [in, out]
        value = value.T
    elif len(flax_shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0].T  # attention stored as a 1x1 conv (old checkpoints)
    return value if value.shape == flax_shape else None


def params_from_diffusers(
    state_dict: Mapping[str, np.ndarray], config: AutoencoderConfig, source: str = "state dict"
) -> Variables:
    """Flax variables of `AutoencoderKL(config)` from a diffusers state dict (numpy arrays).

    Accepts the current attention names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the old
    ones (`query`, `key`, `value`, `proj_attn`), stored as linears [C, C] or 1x1 convs
    [C, C, 1, 1]. Tensors are converted to float32; GroupNorm `weight` becomes `scale`.

    Args:
      state_dict: PyTorch names and layouts (`AutoencoderKL.state_dict()`, a safetensors file).
      config: the architecture the tensors must fit exactly.
      source: names the tensors' origin in the error message.

    Returns:
      `{'params': {...}}`, numpy float32 arrays (placed on devices by the caller).

    Raises:
      AutoencoderWeightsError: naming the first mismatch and counting the others: missing
        or wrong-shape tensors come first, in sorted name order, then unexpected or doubly
        given names in the state dict's order.
    """
    expected = expected_shapes(config)
    found: dict[tuple[str, ...], np.ndarray] = {}
    names: dict[tuple[str, ...], str] = {}
    shape_errors: dict[tuple[str, ...], str] = {}
    late: list[str] = []  # unexpected or duplicate names, in the file's order
    for key, raw in state_dict.items():
        *mods, leaf = _flax_path(key)
        value = np.asarray(raw, np.float32)
        if leaf == "bias":
            dest = (*mods, "bias")
        else:
            dest = next((p for p in ((*mods, "kernel"), (*mods, "scale")) if p in expected),
                        (*mods, "?"))
        if leaf not in ("weight", "bias") or dest not in expected:
            late.append(f"unexpected tensor {key!r} {value.shape}")
            continue
        if dest in names:
            late.append(f"{key!r} and {names[dest]!r} are the same tensor, given twice")
            continue
        names[dest] = key
        want = expected[dest]
        converted = _to_flax(value, want) if dest[-1] == "kernel" else value
        if converted is None or converted.shape != want:
            shape_errors[dest] = (f"{key!r} has shape {value.shape}; the config expects "
                                  f"{_torch_shape(dest, want)}")
        else:
            found[dest] = np.ascontiguousarray(converted)
    problems = [shape_errors.get(p, f"missing tensor {_torch_name(p)!r} {_torch_shape(p, s)}")
                for p, s in expected.items() if p not in found] + late
    if problems:
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        hint = ""
        if any(".mid.attn_1." in k or ".down.0.block." in k for k in state_dict):
            hint = (" These look like original LDM / CompVis names: convert the checkpoint to "
                    "diffusers' layout first (diffusers' AutoencoderKL.from_single_file).")
        raise AutoencoderWeightsError(f"{source} and the autoencoder config disagree: "
                                      f"{problems[0]}{more}.{hint}")
    params: dict[str, Any] = {}
    for path in expected:
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = found[path]
    return {"params": params}


# ---------------------------------------------------------------------------------------
# Loading a folder in diffusers' layout, or a hub id downloaded once.


@functools.lru_cache(maxsize=8)
def _jitted(config: AutoencoderConfig, dtype: Any, precision: Any) -> tuple[Any, Any]:
    """(encode, decode) jitted once per architecture; each compiles once per input shape."""
    module = AutoencoderKL(config, dtype, precision)
    encode = jax.jit(lambda v, x: module.apply(v, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda v, z: module.apply(v, z, method=AutoencoderKL.decode))
    return encode, decode


class Autoencoder:
    """A loaded autoencoder with fixed weights: `encode` and `decode` (jitted, NHWC, float32).

    Attributes:
      config: the architecture (from config.json).
      variables: `{'params': ...}` on the default device.
      digest: sha256 of the weights file ('' when built from arrays): the VAE's identity.
      scaling_factor: latents for a diffusion model are `scaling_factor * mean` (or * sample).
      downsample_factor: image side / latent side (8 for SD's).
      latent_channels: channels of the latents (4 for SD's).
    """

    def __init__(self, config: AutoencoderConfig, variables: Variables, digest: str = "",
                 dtype: Any = jnp.float32, precision: Any = None) -> None:
        self.config = config
        self.variables = jax.device_put(variables)
        self.digest = digest
        self.scaling_factor = float(config.scaling_factor)
        self.downsample_factor = config.downsample_factor
        self.latent_channels = config.latent_channels
        self._encode, self._decode = _jitted(config, dtype, precision)

    def _check(self, x: jax.Array | np.ndarray, channels: int, what: str, step: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % step or x.shape[2] % step:
            raise ValueError(f"{what} must be [B, H, W, {channels}] with H and W multiples of "
                             f"{step}, got shape {tuple(x.shape)}")

    def encode(self, images: jax.Array | np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, C] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, latent_channels]."""
        self._check(images, self.config.in_channels, "images", self.downsample_factor)
        return self._encode(self.variables, jnp.asarray(images, jnp.float32))

    def decode(self, latents: jax.Array | np.ndarray) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C], ~[-1, 1]."""
        self._check(latents, self.latent_channels, "latents", 1)
        return self._decode(self.variables, jnp.asarray(latents, jnp.float32))


def load_autoencoder(
    source: str | os.PathLike,
    *,
    cache_dir: str = AUTOENCODER_CACHE_DIR,
    download: bool = True,
    revision: str | None = None,
    dtype: Any = jnp.float32,
    precision: Any = None,
) -> Autoencoder:
    """The autoencoder of a diffusers folder or hub id, read without torch.

    Args:
      source: a folder holding `config.json` and `diffusion_pytorch_model.safetensors`
        (diffusers' `save_pretrained` layout), or, if no such folder exists, a hub id such as
        'stabilityai/sd-vae-ft-mse' or 'org/pipeline/vae' (a subfolder of a pipeline repo).
      cache_dir: hub ids are fetched once into `cache_dir/<org>--<name>[--sub]`, with the
        files' sha256 recorded in `sha256.json` beside them and checked at every later use.
      download: fetch a hub id missing from the cache (needs huggingface_hub and network).
      revision: of the hub repo (a branch, tag or commit; None: main).
      dtype: compute dtype of convs and linears (float32: SD's `force_upcast`).
      precision: of convs and matmuls, e.g. jax.lax.Precision.HIGHEST on GPU / TPU.

    Raises:
      WeightsError: files missing, unreadable, not fetchable (says which two files to copy
        where) or not matching their recorded sha256.
      AutoencoderWeightsError: config.json is not a supported AutoencoderKL config, or the
        tensors do not fit it (names the first mismatch).
    """
    source = os.fspath(source)
    files = (CONFIG_NAME, WEIGHTS_NAME)
    folder, hint = safetensors_io.resolve_folder(source, files, cache_dir, download, revision)
    hashes = safetensors_io.check_files(folder, files, hint)
    try:
        config = AutoencoderConfig.from_json(json.loads((folder / CONFIG_NAME).read_text()))
    except (ValueError, TypeError) as e:
        raise AutoencoderWeightsError(f"{folder / CONFIG_NAME}: {e}") from e
    state_dict = safetensors_io.read_safetensors(folder / WEIGHTS_NAME, hint)
    variables = params_from_diffusers(state_dict, config, str(folder / WEIGHTS_NAME))
    return Autoencoder(config, variables, hashes[WEIGHTS_NAME], dtype, precision)
