"""LPIPS (VGG16, v0.1) as a pure JAX function, for the consistency-training loss.

Matches the `lpips` package v0.1.x, `LPIPS(net='vgg', version='0.1', lpips=True,
spatial=False)` called with `normalize=False`: images in [-1, 1], its scaling layer, VGG16
features relu1_2 .. relu5_3, unit-normalised over channels as `x / (||x|| + 1e-10)`,
squared difference, 1x1 linear heads without bias, spatial mean, sum over the 5 layers.

Weights (each read by `pretrained.pth`, no torch, sha256 checked in full):
  * backbone: torchvision's ImageNet VGG16, `vgg16-397923af.pth`
    (https://download.pytorch.org/models/vgg16-397923af.pth), sha256
    397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0;
  * heads: LPIPS v0.1 `vgg.pth` (PerceptualSimilarity `lpips/weights/v0.1/vgg.pth`, also
    shipped in the `lpips` wheel), sha256
    a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868.

The OpenAI consistency-model code uses piq's `LPIPS(replace_pooling=True)` instead: the
same network and heads, except that the four 2x2 max-pools become 2x2 average pools
(`pool="avg"` here). piq takes [0, 1] images normalised with ImageNet mean / std, which is
exactly lpips' scaling layer applied to [-1, 1] images ((x+1)/2 - 0.485) / 0.229 =
(x + 0.030) / 0.458, ...), and sums head-weighted channel means, which equals lpips' 1x1
conv then spatial mean. That code resizes images narrower than 256 to 224x224 (bilinear)
before LPIPS; `lpips_distance` does the same.

    variables = load_lpips_variables(config.cm.lpips_vgg_path, config.cm.lpips_lin_path)
    d = lpips_distance(variables, x, y)  # [B]; x, y: [B, H, W, 3] in [-1, 1]
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrained import pth
from pretrained.fetch import DEFAULT_CACHE_DIR, WeightsError, check_hash, download_weights

Variables = dict[str, Any]  # {'params': {'vgg': {'conv1_1': ...}, 'lin0': ..., ...}}

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_NAME = "vgg16-397923af.pth"
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LIN_NAME = "lpips-v0.1-vgg-a78928a0.pth"  # the cached copy; upstream it is `vgg.pth`
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

CHANNELS = (64, 128, 256, 512, 512)  # of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# Per block: (Flax name, index in torchvision's `vgg16().features`, output channels).
_VGG_BLOCKS: tuple[tuple[tuple[str, int, int], ...], ...] = (
    (("conv1_1", 0, 64), ("conv1_2", 2, 64)),
    (("conv2_1", 5, 128), ("conv2_2", 7, 128)),
    (("conv3_1", 10, 256), ("conv3_2", 12, 256), ("conv3_3", 14, 256)),
    (("conv4_1", 17, 512), ("conv4_2", 19, 512), ("conv4_3", 21, 512)),
    (("conv5_1", 24, 512), ("conv5_2", 26, 512), ("conv5_3", 28, 512)),
)
_SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor: x / (sqrt(sum x^2) + eps)
_RESIZE_BELOW = 256  # the consistency-model code resizes images narrower than this


class VGG16Features(nn.Module):
    """The 13 convs of torchvision's VGG16; returns relu1_2, relu2_2, ..., relu5_3 (NHWC).

    Attributes:
      pool: "max" (torchvision, lpips) or "avg" (piq's `replace_pooling=True`).
      dtype: compute dtype of the convs (parameters stay float32).
      precision: of the convs; None is the backend's default.
    """

    pool: str = "max"
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {self.pool!r}")
        pool = nn.max_pool if self.pool == "max" else nn.avg_pool
        feats = []
        for i, block in enumerate(_VGG_BLOCKS):
            if i:  # torch's MaxPool2d(2, 2) / AvgPool2d(2, 2): no padding, odd sizes floor
                x = pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for name, _, width in block:
                conv = nn.Conv(
                    width,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    precision=self.precision,
                    name=name,
                )
                x = nn.relu(conv(x))
            feats.append(x)
        return feats


def _unit_normalize(f: jax.Array) -> jax.Array:
    # lpips' eps placement. Where a pixel's features are all zero, sqrt'(0) makes the
    # cotangent of f NaN, but every such f is a ReLU output at 0, whose gradient (a
    # select) drops it: the gradient w.r.t. the images stays finite (tested).
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _EPS)


class LPIPS(nn.Module):
    """LPIPS distance between two batches of [-1, 1] images `[B, H, W, 3]` -> `[B]`."""

    pool: str = "max"
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"need two [B, H, W, 3] batches of one shape: {a.shape}, {b.shape}")
        vgg = VGG16Features(self.pool, self.dtype, self.precision, name="vgg")
        scale = lambda x: (x.astype(jnp.float32) - jnp.asarray(_SHIFT)) / jnp.asarray(_SCALE)  # noqa: E731
        # Two passes, not one over the concatenated [2B] batch: in the training loss `b`
        # is a stop-gradient target, and with one pass the backward would also run the
        # data gradient through VGG16 for b's half (measured: 953 vs 714 GFLOP for the
        # gradient of 8 pairs at 224; 25% of LPIPS' cost, ~10% of the CT step).
        feats_a, feats_b = vgg(scale(a)), vgg(scale(b))
        total = jnp.zeros((a.shape[0],), jnp.float32)
        for k, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
            fa, fb = (_unit_normalize(f.astype(jnp.float32)) for f in (fa, fb))
            # d(x, x) is 0 only up to rounding (~3e-16 on CPU): XLA may reduce the two
            # passes in different orders.
            diff = jnp.square(fa - fb)  # [B, h, w, C]
            lin = nn.Dense(1, use_bias=False, precision=self.precision, name=f"lin{k}")
            total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
        return total


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, size, size, C]` as torch's `F.interpolate(bilinear)`.

    torch's default (align_corners=False, no antialias) samples at half-pixel centres and
    clamps at the border; `jax.image.resize('bilinear', antialias=False)` does the same
    (its triangle kernel renormalised over in-range pixels gives the clamped value), so
    the two agree to float rounding (~1e-7), upsampling and downsampling alike. With
    antialias=True (JAX's default) downsampling would differ: torch does not antialias.
    """
    shape = (x.shape[0], size, size, x.shape[3])
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


def lpips_distance(
    variables: Variables,
    a: jax.Array,
    b: jax.Array,
    *,
    resize: int | None = 224,
    pool: str = "max",
    dtype: Any = jnp.float32,
    precision: Any = None,
) -> jax.Array:
    """Per-example LPIPS(a, b); jittable and differentiable in `a` and `b`.

    Args:
      variables: from `load_lpips_variables`, `params_from_torch` or `init_variables`.
      a, b: `[B, H, W, 3]` images in [-1, 1].
      resize: as the consistency-model code, images narrower than 256 are first resized
        (bilinear) to `resize` x `resize`; None keeps the native size.
      pool: "max" (the lpips package) or "avg" (piq's `replace_pooling=True`).
      dtype: compute dtype of the VGG convs (jnp.bfloat16 is cheaper on accelerators,
        up to ~2% off float32 on near pairs); normalisation, heads and sums stay float32.
      precision: of convs and heads, e.g. jax.lax.Precision.HIGHEST on TPU / GPU.

    Returns:
      `[B]` float32 distances.
    """
    if resize and a.shape[2] < _RESIZE_BELOW:
        a, b = resize_bilinear(a, resize), resize_bilinear(b, resize)
    return LPIPS(pool, dtype, precision).apply(variables, a, b)


def init_variables(rng: jax.Array) -> Variables:
    """Randomly initialised variables, same tree as `params_from_torch` (tests, smoke runs)."""
    x = jnp.zeros((1, 16, 16, 3), jnp.float32)
    return jax.jit(LPIPS().init)(rng, x, x)


def _torch_slot(key: str) -> tuple[str, str, str] | None:
    """('conv', torch index, 'weight'|'bias'), ('lin', k, 'weight'), or None (ignored)."""
    parts = key.removeprefix("module.").split(".")
    if parts[0] in ("classifier", "scaling_layer"):
        return None  # torchvision's classifier; lpips' constant input scaling
    if parts[0] == "features" and len(parts) == 3:  # torchvision: features.N.weight
        return "conv", parts[1], parts[2]
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
        return "conv", parts[2], parts[3]  # lpips: net.sliceK.N.weight, same N
    if len(parts) == 4 and parts[0].startswith("lin") and parts[1:] == ["model", "1", "weight"]:
        return "lin", parts[0].removeprefix("lin"), "weight"  # lin<k>.model.1.weight
    if len(parts) == 5 and parts[0] == "lins" and parts[2:] == ["model", "1", "weight"]:
        return "lin", parts[1], "weight"  # lpips' alias of the same heads
    raise KeyError(f"unexpected key {key!r} in the LPIPS / VGG16 state dict")


def params_from_torch(state_dict: Mapping[str, np.ndarray]) -> Variables:
    """Flax variables of `LPIPS` from torch-named numpy arrays.

    Accepted names (torch layouts; each tensor must be present, and where two names
    give the same tensor they must agree):
      * torchvision's `vgg16().state_dict()` / `vgg16-397923af.pth`: `features.N.weight`
        [O, I, 3, 3] and `features.N.bias` [O] for N in 0, 2, 5, ..., 28 (`classifier.*`
        is ignored);
      * the lpips heads file `vgg.pth`: `lin0.model.1.weight` [1, 64, 1, 1] .. `lin4...`;
      * the whole `lpips.LPIPS(net='vgg').state_dict()`: `net.sliceK.N.weight/bias`,
        `linK.model.1.weight`, `lins.K.model.1.weight`, `scaling_layer.*` (ignored).
    A `module.` prefix is stripped.

    Returns:
      `{'params': {'vgg': {'conv1_1': {'kernel' [3, 3, I, O], 'bias'}, ...},
      'lin0': {'kernel': [64, 1]}, ..., 'lin4': ...}}` as float32 numpy arrays (the
      caller places them: `cm.train` replicates them over the mesh).

    Raises:
      KeyError: unknown, missing, or conflicting names; ValueError: wrong shapes.
    """
    convs, prev = {}, 3
    for blk in _VGG_BLOCKS:
        for name, idx, width in blk:
            convs[str(idx)] = (name, {"weight": (width, prev, 3, 3), "bias": (width,)})
            prev = width
    found: dict[tuple[str, str], np.ndarray] = {}
    for key, value in state_dict.items():
        slot = _torch_slot(key)
        if slot is None:
            continue
        kind, idx, leaf = slot
        value = np.asarray(value, np.float32)
        if kind == "conv":
            if idx not in convs or leaf not in ("weight", "bias"):
                raise KeyError(f"unexpected key {key!r}: not a VGG16 conv weight or bias")
            name, shapes = convs[idx]
            want = shapes[leaf]
        else:
            if not idx.isdigit() or int(idx) >= len(CHANNELS):
                raise KeyError(f"unexpected key {key!r}: VGG LPIPS has heads lin0 .. lin4")
            name = f"lin{idx}"
            want = (1, CHANNELS[int(idx)], 1, 1)
        if value.shape != want:
            raise ValueError(f"{key!r} has shape {value.shape}, expected {want}")
        if leaf == "weight":  # conv [O, I, kh, kw] -> [kh, kw, I, O]; head -> [C, 1]
            value = value.transpose(2, 3, 1, 0) if kind == "conv" else value[0, :, 0, 0, None]
        dest = (name, "kernel" if leaf == "weight" else "bias")
        if dest in found and not np.array_equal(found[dest], value):
            raise KeyError(f"{key!r} differs from another name for the same tensor")
        found[dest] = value
    expected = [(n, "kernel") for n, _ in convs.values()] + [(n, "bias") for n, _ in convs.values()]
    expected += [(f"lin{k}", "kernel") for k in range(len(CHANNELS))]
    missing = [".".join(d) for d in expected if d not in found]
    if missing:
        raise KeyError(f"missing tensors in the LPIPS / VGG16 state dict: {missing}")
    params: dict[str, Any] = {"vgg": {}}
    for (name, leaf), value in found.items():
        where = params if name.startswith("lin") else params["vgg"]
        where.setdefault(name, {})[leaf] = value  # numpy: placed by the caller
    return {"params": params}


def _installed_lin_path() -> Path | None:
    """The heads file inside an installed `lpips` package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for where in spec.submodule_search_locations:
        path = Path(where) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


def _hint(which: str, target: Path | None) -> str:
    name, url, field = (
        (VGG16_NAME, VGG16_URL, "lpips_vgg_path")
        if which == "vgg"
        else ("vgg.pth (LPIPS v0.1 heads)", LIN_URL, "lpips_lin_path")
    )
    put = f"put it at {target}" if target else "put it in the cache directory"
    return f"Get {name} from {url} and {put}, or point --config.cm.{field} at it."


def _resolve(which: str, path: str, cache_dir: str, download: bool, sha256: str | None) -> Path:
    """The file to read: `path`, else the cached copy (heads: else lpips'), else downloaded."""
    if path:
        return Path(path).expanduser()
    name, url = (VGG16_NAME, VGG16_URL) if which == "vgg" else (LIN_NAME, LIN_URL)
    cached = Path(cache_dir).expanduser() / name
    if which == "lin" and not cached.exists():
        installed = _installed_lin_path()
        if installed is not None:
            return installed
    if download and not cached.exists():
        hint = _hint(which, cached)
        download_weights(cache_dir, url, name, sha256, f"the {name} weights", hint)
    return cached


def _read(which: str, path: Path, sha256: str | None) -> dict[str, np.ndarray]:
    label = "LPIPS VGG16 backbone" if which == "vgg" else "LPIPS linear-head"
    if not path.is_file():
        raise WeightsError(f"{label} weights not found at {path}. {_hint(which, path)}")
    check_hash(path, sha256, f"the {label} weights", _hint(which, path))
    try:
        return pth.read_state_dict(str(path))
    except pth.PthFormatError as e:
        raise WeightsError(f"cannot read {path}: {e}. {_hint(which, path)}") from e


def load_lpips_variables(
    vgg_path: str = "",
    lin_path: str = "",
    cache_dir: str = DEFAULT_CACHE_DIR,
    download: bool = True,
    vgg_sha256: str | None = VGG16_SHA256,
    lin_sha256: str | None = LIN_SHA256,
) -> Variables:
    """Flax variables of `LPIPS` from the released weights (converted once per process).

    Args:
      vgg_path: torchvision's `vgg16-397923af.pth` (`config.cm.lpips_vgg_path`); '' uses
        `cache_dir`, downloading it there once if `download`.
      lin_path: LPIPS v0.1 `vgg.pth` (`config.cm.lpips_lin_path`); '' uses the cached
        copy, else the one in an installed `lpips` package, else downloads it.
      cache_dir: where downloads go.
      download: fetch missing files into `cache_dir`.
      vgg_sha256, lin_sha256: what each file's sha256 must start with (the pinned full
        hashes by default); None skips that check (other weights, tests).

    Raises:
      WeightsError: a file is missing, corrupt, not these weights, or not downloadable;
        the message says where to get it and which config field points at it.
    """
    vgg = _resolve("vgg", vgg_path, cache_dir, download, vgg_sha256)
    lin = _resolve("lin", lin_path, cache_dir, download, lin_sha256)
    keys = []
    for p in (vgg, lin):
        stat = p.stat() if p.is_file() else None
        keys.append((str(p.resolve()), stat and stat.st_size, stat and stat.st_mtime_ns))
    return _load_cached(tuple(keys), vgg_sha256, lin_sha256)


@functools.lru_cache(maxsize=2)
def _load_cached(
    keys: Sequence[tuple[str, int | None, int | None]],
    vgg_sha256: str | None,
    lin_sha256: str | None,
) -> Variables:
    (vgg, _, _), (lin, _, _) = keys  # size and mtime: only part of the cache key
    backbone = _read("vgg", Path(vgg), vgg_sha256)
    heads = _read("lin", Path(lin), lin_sha256)
    try:
        return params_from_torch({**backbone, **heads})
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{vgg} + {lin} are not VGG16 + LPIPS v0.1 vgg heads: {e}") from e
