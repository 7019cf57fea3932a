"""Improved consistency training (iCT; Song & Dhariwal 2023): no EMA target.

The target is the online network under stop-gradient; levels are drawn from the
discrete lognormal distribution (P_mean, P_std) with weight 1 / (t_{n+1} - t_n), on the
exponential curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1 (`cm.schedules`).
"""

import functools

import jax
import jax.numpy as jnp

from cm import schedules
from cm.objectives import consistency
from cm.objectives.spec import Objective
from cm.runtime.views import CMConfig


def num_scales(cfg: CMConfig, step) -> jax.Array:
    return schedules.ict_num_scales(step, cfg.total_steps, cfg.start_scales, cfg.end_scales)


def levels(cfg: CMConfig, step, keys: jax.Array) -> tuple[jax.Array, ...]:
    """(t_n, t_{n+1}, 1 / (t_{n+1} - t_n)) per example key `[B]`, n lognormal."""
    n_scales = num_scales(cfg, step)
    sigmas = consistency.karras_levels(cfg, n_scales)  # [L]
    probs = schedules.lognormal_level_probs(sigmas, n_scales, cfg.p_mean, cfg.p_std)
    logits = jnp.log(jnp.maximum(probs, 1e-30))
    logits = jnp.where(probs > 0, logits, -jnp.inf)
    n = jax.vmap(lambda k: jax.random.categorical(k, logits))(keys)
    t_lo, t_hi = sigmas[n], sigmas[n + 1]
    return t_lo, t_hi, 1.0 / (t_hi - t_lo)


OBJECTIVE = Objective(
    name="ict",
    summary="improved consistency training: online target, lognormal levels, 1/dt weight",
    loss=functools.partial(consistency.consistency_loss, levels=levels, online_target=True),
    sampling=consistency.SAMPLING,
    reads=consistency.READS + ("start_scales", "end_scales", "p_mean", "p_std"),
    meaning_fields=("sigma_min", "sigma_data"),
    objective_fields=("metric", "sigma_max", "rho", "start_scales", "end_scales", "p_mean",
                      "p_std"),
    metric_fields=consistency.METRIC_FIELDS,
    num_scales=num_scales,
    curriculum="ict curriculum",
)
