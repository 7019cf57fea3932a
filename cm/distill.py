"""Consistency distillation (CD) from a frozen EDM teacher (loaded by `cm.setup`).

The teacher takes one Heun step of the probability-flow ODE from t_{n+1} to t_n on
x + t_{n+1} z, with the same (assigned) noise z the student sees; the student matches
its EMA target there, as in CT.
"""

import jax

from cm import consistency, edm

PyTree = consistency.PyTree


def cd_loss(apply_fn: consistency.ApplyFn, cfg: consistency.CMConfig, params: PyTree,
            target_params: PyTree, x: jax.Array, z: jax.Array, step: jax.Array,
            example_keys: jax.Array, dropout_key: jax.Array, labels: jax.Array | None = None,
            *, teacher_params: PyTree, teacher_apply_fn: consistency.ApplyFn,
            lpips_variables: PyTree | None = None) -> tuple[jax.Array, dict]:
    """d(f(x + t_{n+1} z, t_{n+1}), f_target(Heun_teacher(x + t_{n+1} z; t_{n+1} -> t_n), t_n))."""
    t_lo, t_hi, _ = consistency.sample_levels(cfg, step, example_keys)
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
    loss = jax.numpy.mean(d)
    return loss, {"distance": loss}
