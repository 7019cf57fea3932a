"""Image-noise cost matrices on the host, and the checks every entry point shares.

The cost matrix is the pairwise distance between the rows of `x` (images) and `z`
(noise): one float32 matrix product and a fused epilogue, run by XLA on the CPU
device (numpy where JAX has no CPU backend), optionally rounded to a low-precision
dtype as in the authors' fp16 assignment.
"""

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from assignment import _kernels

COSTS = ("l2", "sqeuclidean")
DTYPES: Mapping[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": jnp.bfloat16,  # ml_dtypes' numpy type
}


def check_cost(cost: str) -> str:
    """Returns `cost` if it names a known cost, else raises ValueError."""
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; expected one of {COSTS}")
    return cost


def check_dtype(dtype: Any) -> str:
    """Returns the name of a supported distance dtype (str or numpy dtype-like)."""
    name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", str(dtype))
    if name not in DTYPES:
        raise ValueError(f"unknown distance dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    return name


def check_scale(scale: float) -> float:
    """Returns `scale` as a float if it is finite and positive, else raises ValueError."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a positive number, got {scale!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale!r}")
    return value


def check_pair(x: Any, z: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates an image batch and its noise batch.

    Args:
        x: images, `[B, ...]`, real numbers.
        z: noise, `[B, ...]`, the same shape as `x`.

    Returns:
        `(x, z)` as numpy arrays (not copied when they already are).

    Raises:
        ValueError: shapes differ, no batch axis, a non-numeric dtype, NaN or inf.
    """
    x, z = np.asarray(x), np.asarray(z)
    for name, a in (("x", x), ("z", z)):
        if a.ndim == 0:
            raise ValueError(f"{name} must have a leading batch axis, got a scalar")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if x.shape[0] != z.shape[0]:
        raise ValueError(
            f"batch sizes differ: x has {x.shape[0]} rows, z has {z.shape[0]} "
            f"(x {x.shape}, z {z.shape})"
        )
    if x.shape != z.shape:
        raise ValueError(f"x and z shapes differ: x {x.shape}, z {z.shape}")
    for name, a in (("x", x), ("z", z)):
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise ValueError(f"{name} holds {bad} NaN or inf values")
    return x, z


# Bits of float32's 23-bit fraction that each dtype drops.
_DROPPED_BITS = {"float16": 13, "bfloat16": 16}
_FLOAT16_MAX = 65504.0
_FLOAT16_TINY = 2.0**-14  # Smallest normal float16; below it the spacing is 2**-24.


def quantize(a: np.ndarray, dtype: str) -> np.ndarray:
    """Rounds float32 `a` to the nearest `dtype` value (ties to even), kept as float32.

    Bit-for-bit what `a.astype(dtype).astype(float32)` gives, 10-15x faster than
    numpy's float16 cast: the dropped fraction bits are rounded away in the integer
    view, and float16's subnormal range is rounded with an exact `(a + 0.75) - 0.75`.

    Raises:
        ValueError: a value overflows float16 (|a| >= 65520 would round to inf).
    """
    if dtype == "float32" or a.size == 0:
        return a
    a = np.ascontiguousarray(a, dtype=np.float32)
    drop = _DROPPED_BITS[dtype]
    lo, hi = float(a.min()), float(a.max())
    if dtype == "float16" and max(-lo, hi) >= _FLOAT16_MAX + 16:
        raise ValueError(
            f"costs up to {max(-lo, hi):.4g} overflow float16 (max 65504): "
            "lower `scale`, use cost='l2', or another dtype"
        )
    bits = a.view(np.uint32)
    out = bits >> np.uint32(drop)
    out &= np.uint32(1)  # Ties to even: round up on ties only if the kept lsb is 1.
    out += np.uint32((1 << (drop - 1)) - 1)
    out += bits
    out &= np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    out = out.view(np.float32)
    if dtype == "float16" and not lo >= _FLOAT16_TINY:
        tiny = np.flatnonzero(np.abs(a.ravel()) < _FLOAT16_TINY)
        if tiny.size:  # Float16 subnormals: multiples of 2**-24, float32's ulp at 0.75.
            small = a.ravel()[tiny]
            rounded = (np.abs(small) + np.float32(0.75)) - np.float32(0.75)
            out.ravel()[tiny] = np.copysign(rounded, small)  # -0.0 stays negative.
    return out


def _rows(a: np.ndarray, factor: float, shards: int = 1) -> np.ndarray:
    # [S, B / S, D] float32.
    shape = (shards, a.shape[0] // shards, math.prod(a.shape[1:]))
    flat = np.asarray(a, dtype=np.float32).reshape(shape)
    return flat * np.float32(factor) if factor != 1.0 else flat


def cost_matrix(
    x: Any,
    z: Any,
    *,
    cost: str = "l2",
    dtype: Any = "float32",
    scale: float = 1.0,
    reduced: bool = False,
) -> np.ndarray:
    """Pairwise image-noise costs, `C[i, j] = d(scale * x[i], z[j])`.

    What "fp16 distances" (the authors' quantized assignment) means here: the
    distances are computed in float32 and each is rounded to the nearest `dtype`
    value (ties to even), kept as float32 so that every solver takes it as is:

    1. `<scale * x[i], z[j]>` for all pairs in one float32 matrix product;
    2. `d = |scale * x|^2 + |z|^2 - 2 <scale * x, z>` (clipped at 0) for
       "sqeuclidean", its square root for "l2", in float32;
    3. `d` rounded to `dtype` (nothing to do for float32).

    So the solver sees costs on the coarse grid of `dtype` (2**-5 apart at 32-64 in
    float16), with the ties that brings, which is what the quantization is for.
    The inputs are not rounded: on a GPU, where the matrix product itself runs in
    float16, they are (`device_cost_matrix`); that moves an entry by at most one unit
    of `dtype`. Costs that overflow float16 (over 65504, e.g. "sqeuclidean" at
    large image sizes) raise a ValueError.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`, same shape as `x`.
        cost: "l2" (Euclidean norm, the authors' choice) or "sqeuclidean" (W2).
        dtype: "float32", "float16" or "bfloat16", the precision of the distances.
        scale: images are multiplied by this before the distance.
        reduced: for "sqeuclidean" in float32 only, return `-2 <x, z>` without the
            row and column constants `|x|^2`, `|z|^2`: every permutation's total
            changes by the same amount, so the optimal assignment is unchanged.

    Returns:
        `[B, B]` float32 costs, rows are images and columns are noises.

    Example:
        >>> import numpy as np
        >>> from assignment._cost import cost_matrix
        >>> x = np.array([[0.0, 0.0], [3.0, 4.0]])
        >>> z = np.array([[3.0, 4.0], [0.0, 0.0]])
        >>> cost_matrix(x, z)
        array([[5., 0.],
               [0., 5.]], dtype=float32)
    """
    check_cost(cost)
    dtype = check_dtype(dtype)
    scale = check_scale(scale)
    x, z = check_pair(x, z)
    return matrix(x, z, cost=cost, dtype=dtype, scale=scale, reduced=reduced)[0]


@functools.cache
def _cpu() -> jax.Device | None:
    """The host's XLA CPU device, or None where JAX runs without one."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


@functools.cache
def _host_kernel(kernel: str, **options: Any) -> Any:
    fn = {"pairwise": _kernels.pairwise, "candidates": _kernels.against_candidates}[kernel]
    return jax.jit(functools.partial(fn, round_inputs=False, **options))


def _to_cpu(a: np.ndarray) -> jax.Array:
    # DLPack shares the host buffer (no 12 MB copy per CIFAR batch of 1024);
    # device_put copies, for arrays DLPack cannot export (read-only ones).
    a = np.ascontiguousarray(a)
    try:
        return jax.dlpack.from_dlpack(a)
    except (BufferError, TypeError, RuntimeError):
        return jax.device_put(a, _cpu())


def _run_on_host(kernel: str, a: np.ndarray, b: np.ndarray, scale: float, **options: Any):
    # XLA on the CPU device rather than numpy's BLAS: the epilogue (norms, sqrt,
    # rounding) is fused into one pass, and XLA's thread pool neither spins after
    # the call nor stalls when the cores are busy (OpenBLAS does both, which costs a
    # training step on a shared CPU).
    fn = _host_kernel(kernel, **options)
    d = np.asarray(fn(_to_cpu(a), _to_cpu(b), np.float32(scale)))
    if options["dtype"] == "float16" and d.size and not np.isfinite(d.max()):
        raise ValueError(
            "costs overflow float16 (max 65504): lower `scale`, use cost='l2', or another dtype"
        )
    return d


def matrix(
    x: np.ndarray,
    z: np.ndarray,
    *,
    cost: str,
    dtype: str,
    scale: float,
    reduced: bool = False,
    shards: int = 1,
) -> np.ndarray:
    """`cost_matrix` without the checks, one `[S, n, n]` block per contiguous shard."""
    xs, zs = _rows(x, 1.0, shards), _rows(z, 1.0, shards)  # [S, n, D]
    if xs.size and _cpu() is not None:
        options = {"cost": cost, "dtype": dtype, "reduced": reduced}
        return _run_on_host("pairwise", xs, zs, scale, **options)
    xs = xs * np.float32(scale) if scale != 1.0 else xs
    d = np.matmul(xs, zs.transpose(0, 2, 1))  # [S, n, n], the one O(B^2 D / S) step.
    d *= np.float32(-2.0)  # Exact.
    if reduced and cost == "sqeuclidean" and dtype == "float32":
        return d
    d += np.einsum("sij,sij->si", xs, xs)[:, :, None]
    d += np.einsum("sij,sij->si", zs, zs)[:, None, :]
    np.maximum(d, 0.0, out=d)
    if cost == "l2":
        np.sqrt(d, out=d)
    return quantize(d, dtype)


def pair_costs(
    x: np.ndarray,
    candidates: np.ndarray,
    *,
    cost: str = "l2",
    dtype: str = "float32",
    scale: float = 1.0,
) -> np.ndarray:
    """Costs of given pairs, `c[i, k] = d(scale * x[i], candidates[i, k])`.

    Follows the same recipe as `cost_matrix` (float32 arithmetic, the result rounded
    to `dtype`), one image against its own K candidates.

    Args:
        x: images, `[B, D]`.
        candidates: noise candidates, `[B, K, D]`.
        cost: as in `cost_matrix`.
        dtype: as in `cost_matrix` (a name in `DTYPES`).
        scale: as in `cost_matrix`.

    Returns:
        `[B, K]` float32 costs.
    """
    xs = _rows(x, 1.0)[0]  # [B, D]
    cs = np.asarray(candidates, dtype=np.float32)  # [B, K, D]
    if cs.size and _cpu() is not None:
        return _run_on_host("candidates", xs, cs, scale, cost=cost, dtype=dtype)
    xs = xs * np.float32(scale) if scale != 1.0 else xs
    inner = np.matmul(cs, xs[:, :, None])[..., 0]  # [B, K]
    d = np.einsum("bd,bd->b", xs, xs)[:, None] + np.einsum("bkd,bkd->bk", cs, cs)
    d -= 2 * inner
    np.maximum(d, 0.0, out=d)
    if cost == "l2":
        np.sqrt(d, out=d)
    return quantize(d, dtype)
