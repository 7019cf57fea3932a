"""Distance kernels in jnp, shared by the host path (jitted on the CPU device) and the
on-device path (traced inside the training step).

One recipe: `d = |x|^2 + |z|^2 - 2 <x, z>` with float32 products and sums, clipped at
0, square-rooted for "l2", rounded to the distance dtype. `round_inputs` also casts
the inputs to that dtype first, so that a GPU runs the product on its fp16/bf16
matrix units; the host leaves them in float32.
"""

import jax
import jax.numpy as jnp

_LOW = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _prepare(a: jax.Array, factor: float | jax.Array, dtype: str, round_inputs: bool):
    a = a.astype(jnp.float32) * factor
    if round_inputs and dtype != "float32":
        return a.astype(_LOW[dtype]), None
    # Float32 products in full precision (no TF32 on GPUs).
    return a, jax.lax.Precision.HIGHEST


def _finish(d: jax.Array, cost: str, dtype: str) -> jax.Array:
    d = jnp.maximum(d, 0.0)
    if cost == "l2":
        d = jnp.sqrt(d)
    if dtype == "float32":
        return d
    return d.astype(_LOW[dtype]).astype(jnp.float32)


def _sq_norms(a: jax.Array) -> jax.Array:
    a = a.astype(jnp.float32)
    return jnp.sum(a * a, axis=-1)


def pairwise(
    x: jax.Array,
    z: jax.Array,
    scale: float | jax.Array,
    *,
    cost: str,
    dtype: str,
    round_inputs: bool,
    reduced: bool = False,
) -> jax.Array:
    """All-pairs costs within each shard: `[S, n, D]` x `[S, n, D]` -> `[S, n, n]`.

    `reduced` (sqeuclidean in float32 only) returns `-2 <x, z>`: the norms add the
    same amount to every permutation's total.
    """
    xs, precision = _prepare(x, scale, dtype, round_inputs)
    zs, _ = _prepare(z, 1.0, dtype, round_inputs)
    inner = jnp.einsum(
        "snd,smd->snm", xs, zs, precision=precision, preferred_element_type=jnp.float32
    )
    if reduced and cost == "sqeuclidean" and dtype == "float32":
        return -2.0 * inner
    d = _sq_norms(xs)[:, :, None] + _sq_norms(zs)[:, None, :] - 2.0 * inner
    return _finish(d, cost, dtype)


def against_candidates(
    x: jax.Array,
    candidates: jax.Array,
    scale: float | jax.Array,
    *,
    cost: str,
    dtype: str,
    round_inputs: bool,
) -> jax.Array:
    """Each image against its own candidates: `[B, D]` x `[B, K, D]` -> `[B, K]`."""
    xs, precision = _prepare(x, scale, dtype, round_inputs)
    cs, _ = _prepare(candidates, 1.0, dtype, round_inputs)
    inner = jnp.einsum(
        "bkd,bd->bk", cs, xs, precision=precision, preferred_element_type=jnp.float32
    )
    d = _sq_norms(xs)[:, None] + _sq_norms(cs) - 2.0 * inner
    return _finish(d, cost, dtype)
