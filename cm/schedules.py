"""Noise-level discretisations and training curricula of consistency models.

Closed forms from Song et al. 2023 (CT: adaptive N(k), mu(k)) and Song & Dhariwal
2023 (iCT: exponential curriculum, discrete lognormal level sampling). All functions
are pure and jittable; the step `k` may be a traced integer.
"""

import jax
import jax.numpy as jnp
import numpy as np


def karras_sigmas(n: int | jax.Array, sigma_min: float, sigma_max: float, rho: float,
                  max_n: int | None = None) -> jax.Array:
    """Ascending Karras times t_0 = sigma_min < ... < t_{n-1} = sigma_max.

    Args:
      n: number of levels N (may be traced; then `max_n` must bound it).
      sigma_min, sigma_max, rho: the discretisation parameters.
      max_n: static length of the returned array; entries past `n - 1` repeat
        sigma_max. Defaults to `n`, which must then be a Python int.

    Returns:
      float32 array `[max_n]`.
    """
    length = int(n) if max_n is None else max_n
    i = jnp.arange(length, dtype=jnp.float32)
    frac = jnp.minimum(i / (jnp.asarray(n, jnp.float32) - 1.0), 1.0)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + frac * (hi - lo)) ** rho


def ct_num_scales(k: int | jax.Array, total_steps: int, s0: int, s1: int) -> jax.Array:
    """CT adaptive N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1."""
    k = jnp.asarray(k, jnp.float32)
    inner = k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2
    return (jnp.ceil(jnp.sqrt(inner) - 1.0) + 1.0).astype(jnp.int32)


def ct_ema_decay(num_scales: int | jax.Array, s0: int, mu0: float) -> jax.Array:
    """CT target EMA mu(k) = exp(s0 ln(mu0) / N(k))."""
    return jnp.exp(s0 * np.log(mu0) / jnp.asarray(num_scales, jnp.float32))


def ict_num_scales(k: int | jax.Array, total_steps: int, s0: int, s1: int) -> jax.Array:
    """iCT exponential curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1."""
    k_prime = np.floor(total_steps / (np.log2(np.floor(s1 / s0)) + 1))
    k_prime = max(int(k_prime), 1)
    doublings = jnp.floor(jnp.asarray(k, jnp.float32) / k_prime)
    n = jnp.minimum(s0 * 2.0 ** jnp.minimum(doublings, 30.0), s1) + 1
    return n.astype(jnp.int32)


def max_scales(s1: int) -> int:
    """Static upper bound of N(k) over training (both curricula end at s1 + 1)."""
    return s1 + 1


def lognormal_level_probs(sigmas: jax.Array, num_scales: int | jax.Array, p_mean: float,
                          p_std: float) -> jax.Array:
    """iCT discrete lognormal probabilities of the level index n in 0..N-2.

    P(n) is proportional to erf((ln t_{n+1} - P_mean) / (sqrt(2) P_std)) -
    erf((ln t_n - P_mean) / (sqrt(2) P_std)). Entries with n >= N - 1 are zero.

    Args:
      sigmas: ascending times `[L]` (from `karras_sigmas` with `max_n=L`).
      num_scales: current N (may be traced).

    Returns:
      float32 `[L - 1]` summing to 1.
    """
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (np.sqrt(2.0) * p_std))
    weights = cdf[1:] - cdf[:-1]
    valid = jnp.arange(sigmas.shape[0] - 1) < (jnp.asarray(num_scales) - 1)
    weights = jnp.where(valid, weights, 0.0)
    return weights / jnp.sum(weights)
