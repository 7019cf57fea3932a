"""On-device (jittable) assignment, for use inside a jitted training step.

`assignment.device_assign(x, z, method, key=..., ...)` is the counterpart of `assign`: pure jnp,
static options, so it works under `jax.jit`, `jax.vmap` (one problem per shard) and
`shard_map`. The exact method uses `optax.assignment.hungarian_algorithm`; knn draws
its candidates from a JAX PRNG key. Costs follow the recipe of `cost_matrix`.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from assignment import _cost, _kernels, _knn


def _flat(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], math.prod(a.shape[1:]))  # [B, D]


def _check(cost: str, dtype: Any, scale: float) -> tuple[str, str, float]:
    return _cost.check_cost(cost), _cost.check_dtype(dtype), _cost.check_scale(scale)


def device_cost_matrix(
    x: jax.Array, z: jax.Array, *, cost: str = "l2", dtype: Any = "float32", scale: float = 1.0
) -> jax.Array:
    """Pairwise costs on device, the recipe of `cost_matrix` run on a matrix unit.

    The inputs are cast to `dtype` (so that float16/bfloat16 products run on the
    tensor cores), the products accumulate in float32 (`preferred_element_type`),
    the distance is computed in float32 and rounded to `dtype`, as on the host.
    The input rounding and the summation order can move an entry by one unit of
    `dtype` from the host's `cost_matrix`.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`.
        cost: "l2" or "sqeuclidean".
        dtype: "float32", "float16" or "bfloat16".
        scale: images are multiplied by this before the distance.

    Returns:
        `[B, B]` float32 costs.

    Example:
        >>> import jax.numpy as jnp
        >>> from assignment._device import device_cost_matrix
        >>> device_cost_matrix(jnp.zeros((2, 3)), jnp.ones((2, 3)), cost="sqeuclidean")
        Array([[3., 3.],
               [3., 3.]], dtype=float32)
    """
    cost, dtype, scale = _check(cost, dtype, scale)
    options = {"cost": cost, "dtype": dtype, "round_inputs": True}
    return _kernels.pairwise(_flat(x)[None], _flat(z)[None], scale, **options)[0]


def device_permutation(
    x: jax.Array,
    z: jax.Array,
    method: str = "linear",
    *,
    cost: str = "l2",
    dtype: Any = "float32",
    scale: float = 1.0,
) -> jax.Array:
    """The minimum-total-cost permutation on device, `z[perm]` the assigned noise.

    Solved with `optax.assignment.hungarian_algorithm` (float32 potentials: exact on
    quantized costs, within float32 rounding of the optimum on float32 costs). Its
    augmenting paths are sequential `while_loop`s, slow on any backend: measured
    0.13 / 0.39 / 1.4 / 5.7 s at batch 128 / 256 / 512 / 1024 on an H200, and
    9 / 50 / 300 ms at 128 / 256 / 512 on 2 CPU cores, against 0.4 / 2 / 11 / 57 ms
    for the host's `lapjvh`. Use it for small per-device shards only.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`.
        method: "linear" or "none".
        cost: see `device_cost_matrix`.
        dtype: see `device_cost_matrix`.
        scale: see `device_cost_matrix`.

    Returns:
        `[B]` int32 permutation.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from assignment._device import device_permutation
        >>> x = jnp.array([[1.0, 1.0], [-1.0, -1.0]])
        >>> z = jnp.array([[-0.9, -1.2], [1.1, 0.8]])
        >>> jax.jit(device_permutation)(x, z)
        Array([1, 0], dtype=int32)
    """
    if method not in ("none", "linear"):
        raise ValueError(f"unknown permuting method {method!r}; expected 'none' or 'linear'")
    cost, dtype, scale = _check(cost, dtype, scale)
    _check_pair(x, z)
    b = x.shape[0]
    if method == "none" or b <= 1:
        return jnp.arange(b, dtype=jnp.int32)
    c = device_cost_matrix(x, z, cost=cost, dtype=dtype, scale=scale)
    rows, cols = optax.assignment.hungarian_algorithm(c)
    return jnp.zeros(b, jnp.int32).at[rows].set(cols.astype(jnp.int32))


def device_knn_candidates(z: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """`z` and k - 1 standard normal draws from `key`, `[B, k, ...]` (see `knn_candidates`)."""
    k = _knn.check_k(k)
    fresh = jax.random.normal(key, (z.shape[0], k - 1, *z.shape[1:]), jnp.float32)
    return jnp.concatenate([z[:, None], fresh.astype(z.dtype)], axis=1)


def device_nearest(
    x: jax.Array,
    candidates: jax.Array,
    *,
    cost: str = "l2",
    dtype: Any = "float32",
    scale: float = 1.0,
) -> jax.Array:
    """Index of each image's nearest candidate, `[B]`, as `nearest` on the host."""
    cost, dtype, scale = _check(cost, dtype, scale)
    b, k = candidates.shape[:2]
    cs = candidates.reshape(b, k, math.prod(candidates.shape[2:]))  # [B, K, D]
    options = {"cost": cost, "dtype": dtype, "round_inputs": True}
    return jnp.argmin(_kernels.against_candidates(_flat(x), cs, scale, **options), axis=1)


def _none(x: jax.Array, z: jax.Array, key: jax.Array | None, **options: Any) -> jax.Array:
    del x, key
    _check(**options)
    return z


def _linear(x: jax.Array, z: jax.Array, key: jax.Array | None, **options: Any) -> jax.Array:
    del key
    return z[device_permutation(x, z, "linear", **options)]


def _knn_assign(
    x: jax.Array, z: jax.Array, key: jax.Array | None, *, k: int = 4, **options: Any
) -> jax.Array:
    if _knn.check_k(k) == 1:
        return z
    if key is None:
        raise ValueError("device knn with k > 1 needs key, a JAX PRNG key")
    candidates = device_knn_candidates(z, k, key)
    index = device_nearest(x, candidates, **options)
    return candidates[jnp.arange(z.shape[0]), index]


DEVICE_METHODS: Mapping[str, Callable[..., jax.Array]] = {
    "none": _none,
    "linear": _linear,
    "knn": _knn_assign,
}


def _check_pair(x: jax.Array, z: jax.Array) -> None:
    if x.ndim == 0 or x.shape != z.shape:
        raise ValueError(f"x and z must have the same [B, ...] shape, got {x.shape} and {z.shape}")


def device_assign(
    x: jax.Array,
    z: jax.Array,
    method: str,
    *,
    key: jax.Array | None = None,
    k: int = 4,
    cost: str = "l2",
    dtype: Any = "float32",
    scale: float = 1.0,
) -> jax.Array:
    """The jittable counterpart of `assign`, for the on-device path.

    All options are static (Python values); only `x`, `z` and `key` are traced, so
    wrap with `functools.partial` before `jax.jit`, and `jax.vmap` over a leading
    shard axis to assign each device shard separately. Values are not checked for
    NaN (they are traced); shapes and options are.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`.
        method: a key of `DEVICE_METHODS` ("none", "linear", "knn").
        key: PRNG key for knn's k - 1 fresh draws per image (unused otherwise).
        k: knn candidates per image.
        cost: see `device_cost_matrix`.
        dtype: see `device_cost_matrix`.
        scale: see `device_cost_matrix`.

    Returns:
        The assigned noise, z's shape and dtype.

    Example:
        >>> import functools, jax, jax.numpy as jnp
        >>> from assignment import device_assign
        >>> fn = jax.jit(jax.vmap(functools.partial(device_assign, method="linear")))
        >>> x = jnp.array([[[1.0], [-1.0]], [[2.0], [-2.0]]])  # 2 shards of 2
        >>> fn(x, -x)[:, :, 0]
        Array([[ 1., -1.],
               [ 2., -2.]], dtype=float32)
    """
    if method not in DEVICE_METHODS:
        raise ValueError(
            f"unknown assignment method {method!r}; expected one of {tuple(DEVICE_METHODS)}"
        )
    _check_pair(x, z)
    options = {"cost": cost, "dtype": dtype, "scale": scale}
    if method == "knn":
        options["k"] = k
    return DEVICE_METHODS[method](x, z, key, **options)
