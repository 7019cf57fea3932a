"""The FID InceptionV3 of pytorch-fid in Flax: parameters, preprocessing, batched features.

This is the TF 2015-12-05 Inception network as ported by pytorch-fid (`fid_inception_v3()`;
the Linen modules are in `inception_net`): 1008 classes, no aux logits, average pooling
that excludes padding in Mixed_5b..5d, 6b..6e and 7b, max pooling in the pool branch of
Mixed_7c, BatchNorm eps 1e-3. Inputs are uint8 images of any size, resized to 299x299
exactly as torch's `F.interpolate(mode='bilinear', align_corners=False)` and scaled to
[-1, 1]. Parameters come from a pytorch-fid state dict (`params_from_torch`);
`evaluation.weights` reads the released weights file without PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from evaluation.inception_net import FEATURE_DIM, INPUT_SIZE, NUM_CLASSES, InceptionV3

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "NUM_CLASSES",
    "InceptionV3",
    "Variables",
    "features_and_logits",
    "init_params",
    "params_from_torch",
    "pool_features",
    "preprocess",
    "resize_matrix",
]

Variables = dict[str, Any]  # {'params': ..., 'batch_stats': ...}, pytorch-fid's module names


# ----------------------------------------------------------------------------------------
# Parameters from a pytorch-fid state dict.

# pytorch-fid's `InceptionV3([3])` wrapper names its modules blocks.<i>.<j>; the released
# weights file and `fid_inception_v3()` use torchvision's names.
_WRAPPER_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),  # then a max pool
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),  # then a max pool
    (
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
    ),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),  # then the average pool
)
_WRAPPER_NAMES = {
    f"blocks.{i}.{j}": name
    for i, names in enumerate(_WRAPPER_BLOCKS)
    for j, name in enumerate(names)
}

# torch leaf name -> (Flax collection, Flax leaf name).
_LEAVES = {
    "conv.weight": ("params", "kernel"),
    "bn.weight": ("params", "scale"),
    "bn.bias": ("params", "bias"),
    "bn.running_mean": ("batch_stats", "mean"),
    "bn.running_var": ("batch_stats", "var"),
}


def _torch_name(key: str) -> str:
    """Maps a wrapper name (blocks.0.0.conv.weight) to torchvision's (Conv2d_1a_3x3...)."""
    key = key.removeprefix("module.")  # saved from nn.DataParallel
    if key.startswith("blocks."):
        prefix = ".".join(key.split(".")[:3])
        if prefix not in _WRAPPER_NAMES:
            raise KeyError(f"unknown pytorch-fid wrapper module {prefix!r} in {key!r}")
        key = _WRAPPER_NAMES[prefix] + key[len(prefix) :]
    return key


@functools.cache
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax variable paths (collection, module..., leaf) -> shapes, from an abstract init."""
    abstract = jax.eval_shape(
        InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    )
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def params_from_torch(state_dict: Mapping[str, np.ndarray]) -> Variables:
    """Flax variables of `InceptionV3` from a pytorch-fid state dict of numpy arrays.

    Accepted key names (both give the same variables):
      * torchvision's, as in the released `pt_inception-2015-12-05-6726825d.pth` and
        `pytorch_fid.inception.fid_inception_v3().state_dict()`:
        `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_var`, ...,
        `fc.weight` [1008, 2048], `fc.bias` [1008];
      * pytorch-fid's wrapper `InceptionV3([3]).state_dict()`: `blocks.0.0.conv.weight`,
        ..., `blocks.3.2.branch_pool.bn.running_mean` (this one has no `fc`).
    BatchNorm `num_batches_tracked` buffers are ignored; a `module.` prefix is stripped.
    Every conv / BatchNorm tensor must be present; `fc` is optional (without it there are
    features but no logits).

    Args:
      state_dict: name -> array (torch layouts: conv weights [O, I, kh, kw]).

    Returns:
      `{'params': ..., 'batch_stats': ...}` as jax arrays; `params['fc']` holds
      `kernel` [2048, 1008] and `bias` [1008] when the state dict has them.

    Raises:
      KeyError: unknown, missing or duplicated names; ValueError: wrong shapes.
    """
    expected = _expected_shapes()
    variables: Variables = {}
    seen: dict[tuple[str, ...], str] = {}
    for key, value in state_dict.items():
        name = _torch_name(key)
        if name.endswith("num_batches_tracked"):
            continue
        value = np.asarray(value)
        if name in ("fc.weight", "fc.bias"):
            path = ("params", "fc", "kernel" if name == "fc.weight" else "bias")
            value = value.T if name == "fc.weight" and value.ndim == 2 else value
            shape = (FEATURE_DIM, NUM_CLASSES) if name == "fc.weight" else (NUM_CLASSES,)
        else:
            parts = name.split(".")
            leaf = ".".join(parts[-2:])
            if leaf not in _LEAVES:
                raise KeyError(f"unexpected key {key!r} in the Inception state dict")
            collection, flax_leaf = _LEAVES[leaf]
            path = (collection, *parts[:-1], flax_leaf)
            if path not in expected:
                raise KeyError(f"unexpected key {key!r} in the Inception state dict")
            shape = expected[path]
            if leaf == "conv.weight" and value.ndim == 4:
                value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        if value.shape != shape:
            raise ValueError(f"{key!r}: shape {value.shape} does not fit {shape} (Flax layout)")
        if path in seen:
            raise KeyError(f"{key!r} and {seen[path]!r} name the same tensor")
        seen[path] = key
        _set(variables, path, jnp.asarray(value, dtype=jnp.float32))
    missing = [p for p in expected if p not in seen]
    if missing:
        names = [".".join(p[1:-1]) + "." + p[-1] for p in missing[:5]]
        raise KeyError(
            f"{len(missing)} Inception tensors missing from the state dict, e.g. {names} "
            "(Flax names); is this pytorch-fid's FID Inception?"
        )
    return variables


def init_params(rng: jax.Array, precision: str = "highest") -> Variables:
    """Random variables of the same structure (with `fc`), for benchmarks and smoke tests."""
    k_trunk, k_fc = jax.random.split(rng)
    x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    variables = jax.jit(InceptionV3(precision).init)(k_trunk, x)
    variables = {k: dict(v) for k, v in variables.items()}
    variables["params"]["fc"] = {
        "kernel": 0.01 * jax.random.normal(k_fc, (FEATURE_DIM, NUM_CLASSES)),
        "bias": jnp.zeros((NUM_CLASSES,)),
    }
    return variables


# ----------------------------------------------------------------------------------------
# Preprocessing: torch's bilinear resize (align_corners=False, no antialias) to 299.


@functools.cache
def resize_matrix(in_size: int, out_size: int = INPUT_SIZE) -> np.ndarray:
    """[out_size, in_size] interpolation weights of torch's bilinear, align_corners=False.

    Torch's rule (no antialiasing, for both up- and downsampling): the source coordinate
    of output pixel i is max((i + 0.5) * in/out - 0.5, 0); it mixes the two neighbouring
    input pixels (the upper one clamped to the edge) linearly.
    """
    # In float32 like torch's kernels, with the fused multiply-add they compile to: the
    # product is exact in float64, then one rounding. Matches torch's weights bit for bit.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=f32) + f32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0.astype(f32)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), f32(1.0) - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1], in pytorch-fid's order."""
    _, h, w, _ = images.shape
    x = images.astype(jnp.float32) / 255.0  # torchvision's ToTensor
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", resize_matrix(h), x, precision=hi)
    x = jnp.einsum("pw,bowc->bopc", resize_matrix(w), x, precision=hi)
    return 2.0 * x - 1.0


# ----------------------------------------------------------------------------------------
# Batched, jitted feature extraction.


@functools.cache
def _compiled(precision: str) -> tuple[Callable, Callable]:
    """(preprocess, forward) jitted once per precision; jit caches one program per shape.

    Preprocessing and the network are separate programs, so a new input size only
    compiles the cheap resize while the network stays compiled for [B, 299, 299, 3].
    """
    net = InceptionV3(precision)

    def forward(variables: Variables, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        trunk = {
            "params": {k: v for k, v in variables["params"].items() if k != "fc"},
            "batch_stats": variables["batch_stats"],
        }
        pool = net.apply(trunk, x)  # [B, 2048]
        fc = variables["params"].get("fc")
        logits = None
        if fc is not None:
            logits = jnp.dot(pool, fc["kernel"], precision=jax.lax.Precision.HIGHEST)
        return pool, logits  # logits: [B, 1008], no bias

    return jax.jit(preprocess), jax.jit(forward)


def _batches(
    variables: Variables, images: np.ndarray, batch_size: int, precision: str
) -> Iterator[tuple[int, jax.Array, jax.Array | None]]:
    """Yields (n_valid, pool, logits) per batch; the last batch is padded to full size."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    devices = jax.local_devices()
    n = images.shape[0]
    # One batch shape for the whole call (no recompiles), a multiple of the device count.
    batch = min(batch_size, max(n, 1))
    batch = -(-batch // len(devices)) * len(devices)
    mesh = Mesh(np.asarray(devices), ("data",))
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    prep, forward = _compiled(precision)
    for start in range(0, n, batch):
        chunk = images[start : start + batch]
        valid = chunk.shape[0]
        if valid < batch:
            pad = np.zeros((batch - valid, *chunk.shape[1:]), np.uint8)
            chunk = np.concatenate([chunk, pad])
        x = prep(jax.device_put(chunk, data_sharding))  # [batch, 299, 299, 3]
        pool, logits = forward(variables, x)
        yield valid, pool, logits


def _collect(
    variables: Variables, images: np.ndarray, batch_size: int, precision: str, logits: bool
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Runs every batch; fetches each result only after the next batch is dispatched."""
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    pending = None
    for batch in _batches(variables, images, batch_size, precision):
        if pending is not None:
            out.append(_fetch(*pending, logits))
        pending = batch
    if pending is not None:
        out.append(_fetch(*pending, logits))
    return out


def _fetch(
    valid: int, pool: jax.Array, lg: jax.Array | None, logits: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    return np.asarray(pool)[:valid], (np.asarray(lg)[:valid] if logits else None)


def features_and_logits(
    variables: Variables,
    images: np.ndarray,
    batch_size: int = 200,
    bias: bool = False,
    precision: str = "highest",
) -> tuple[np.ndarray, np.ndarray]:
    """Pool features and 1008-way logits of uint8 images, from one forward pass.

    The logits are `pool @ fc.weight.T` without the bias by default: the original
    Inception Score code (improved-GAN's `softmax/logits/MatMul` of this same TF graph)
    and torch-fidelity's `logits_unbiased` use these, softmaxed over all 1008 classes.
    `bias=True` gives torch's `fc(pool)`.

    Args:
      variables: from `params_from_torch` (must include `fc`) or `init_params`.
      images: uint8 [N, H, W, 3], any H and W.
      batch_size: images per forward pass (rounded up to a multiple of the local devices).
      bias: add `fc.bias` to the logits.
      precision: convolution precision; 'highest' matches pytorch-fid on CPU to ~1e-6.

    Returns:
      float32 features [N, 2048] and float32 logits [N, 1008].
    """
    fc = variables["params"].get("fc")
    if fc is None:
        raise KeyError("these Inception variables have no 'fc' layer: logits need fc.weight")
    parts = _collect(variables, images, batch_size, precision, logits=True)
    if not parts:
        return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    feats = np.concatenate([f for f, _ in parts])
    logits = np.concatenate([lg for _, lg in parts])
    if bias:
        logits = logits + np.asarray(fc["bias"], np.float32)
    return feats, logits


def pool_features(
    variables: Variables, images: np.ndarray, batch_size: int = 200, precision: str = "highest"
) -> np.ndarray:
    """2048-d pool features of uint8 images [N, H, W, 3] -> float32 [N, 2048].

    Jitted (the network compiles once per batch size), batched, sharded over the local
    devices; the last batch is padded so every batch has the same shape.

    Args:
      variables: from `params_from_torch`, `weights.load_inception_variables` or
        `init_params`.
      images: uint8 [N, H, W, 3], any H and W (resized to 299 as pytorch-fid does).
      batch_size: images per forward pass (rounded up to a multiple of the local devices).
      precision: convolution precision; 'highest' matches pytorch-fid on CPU to ~1e-6.
    """
    parts = _collect(variables, images, batch_size, precision, logits=False)
    if not parts:
        return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate([f for f, _ in parts])
