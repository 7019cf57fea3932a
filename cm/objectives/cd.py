"""Consistency distillation (CD; Song et al. 2023) from a frozen EDM teacher.

The teacher (the EMA parameters of an EDM run, `cm.teacher_workdir`, loaded by
`cm.setup`) takes one Heun step of the probability-flow ODE from t_{n+1} to t_n on
x + t_{n+1} z, with the same (paired) noise z the student sees; the student matches its
target there, as in CT. Fixed discretisation N = `cm.end_scales` (18 for CIFAR-10),
fixed target EMA mu = `cm.start_ema` (0 for CIFAR-10: the target is the online network).
A new CD run starts from its teacher (`cm.init_from`).
"""

import jax
import jax.numpy as jnp

from cm.objectives import consistency, edm
from cm.objectives.spec import ApplyFn, Objective, PyTree
from cm.runtime.views import CMConfig


def num_scales(cfg: CMConfig, step) -> jax.Array:
    del step
    return jnp.asarray(cfg.end_scales, jnp.int32)


def target_decay(cfg: CMConfig, step) -> jax.Array:
    del step
    return jnp.asarray(cfg.start_ema, jnp.float32)


def levels(cfg: CMConfig, step, keys: jax.Array) -> tuple[jax.Array, ...]:
    """(t_n, t_{n+1}, weight 1) per example key `[B]`, n uniform in 0..N-2."""
    n_scales = num_scales(cfg, step)
    return consistency.uniform_levels(n_scales, consistency.karras_levels(cfg, n_scales), keys)


def cd_loss(apply_fn: ApplyFn, cfg: CMConfig, params: PyTree, target_params: PyTree,
            x: jax.Array, z: jax.Array, step: jax.Array, example_keys: jax.Array,
            dropout_key: jax.Array, labels: jax.Array | None = None, *,
            teacher_params: PyTree, teacher_apply_fn: ApplyFn,
            lpips_variables: PyTree | None = None) -> tuple[jax.Array, dict]:
    """d(f(x + t_{n+1} z, t_{n+1}), f_target(Heun_teacher(x + t_{n+1} z; t_{n+1} -> t_n), t_n))."""
    t_lo, t_hi, _ = levels(cfg, step, example_keys)
    x_hi = x + t_hi[:, None, None, None] * z
    x_lo = edm.heun_step(teacher_apply_fn, teacher_params, x_hi, t_hi, t_lo, cfg.sigma_data,
                         labels)
    x_lo = jax.lax.stop_gradient(x_lo)
    online = consistency.consistency_fn(apply_fn, params, x_hi, t_hi, cfg, labels, True,
                                        dropout_key)
    target = consistency.consistency_fn(apply_fn, target_params, x_lo, t_lo, cfg, labels, True,
                                        dropout_key)
    d = consistency.distance(online, jax.lax.stop_gradient(target), cfg.metric, cfg.huber_c,
                             lpips_variables, cfg)
    loss = jnp.mean(d)
    return loss, {"distance": loss}


OBJECTIVE = Objective(
    name="cd",
    summary="consistency distillation: one Heun step of an EDM teacher, fixed N and mu",
    loss=cd_loss,
    sampling=consistency.SAMPLING,
    reads=consistency.READS + ("end_scales", "start_ema", "teacher_workdir"),
    meaning_fields=("sigma_min", "sigma_data"),
    objective_fields=("metric", "sigma_max", "rho", "end_scales", "start_ema"),
    metric_fields=consistency.METRIC_FIELDS,
    keeps_target=True,
    num_scales=num_scales,
    target_decay=target_decay,
    teacher="edm",
    seeds_from_teacher=True,
)
