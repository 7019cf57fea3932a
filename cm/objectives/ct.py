"""Consistency training (CT; Song et al. 2023): an EMA target and an adaptive curriculum.

d(f(x + t_{n+1} z, t_{n+1}), f_target(x + t_n z, t_n)) with the same (paired) noise z,
n uniform in 0..N(k)-2, N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 and
the target EMA mu(k) = exp(s0 ln(mu0) / N(k)) (`cm.schedules`).
"""

import functools

import jax

from cm import schedules
from cm.objectives import consistency
from cm.objectives.spec import Objective
from cm.runtime.views import CMConfig


def num_scales(cfg: CMConfig, step) -> jax.Array:
    return schedules.ct_num_scales(step, cfg.total_steps, cfg.start_scales, cfg.end_scales)


def target_decay(cfg: CMConfig, step) -> jax.Array:
    return schedules.ct_ema_decay(num_scales(cfg, step), cfg.start_scales, cfg.start_ema)


def levels(cfg: CMConfig, step, keys: jax.Array) -> tuple[jax.Array, ...]:
    """(t_n, t_{n+1}, weight 1) per example key `[B]`, n uniform in 0..N(k)-2."""
    n_scales = num_scales(cfg, step)
    return consistency.uniform_levels(n_scales, consistency.karras_levels(cfg, n_scales), keys)


OBJECTIVE = Objective(
    name="ct",
    summary="consistency training: EMA target, adaptive curriculum N(k), mu(k)",
    loss=functools.partial(consistency.consistency_loss, levels=levels, online_target=False),
    sampling=consistency.SAMPLING,
    reads=consistency.READS + ("start_scales", "end_scales", "start_ema"),
    meaning_fields=("sigma_min", "sigma_data"),
    objective_fields=("metric", "sigma_max", "rho", "start_scales", "end_scales", "start_ema"),
    metric_fields=consistency.METRIC_FIELDS,
    keeps_target=True,
    num_scales=num_scales,
    target_decay=target_decay,
    curriculum="ct curriculum",
)
