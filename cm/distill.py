"""Consistency distillation (CD) from a frozen EDM teacher, and loading that teacher.

The teacher takes one Heun step of the probability-flow ODE from t_{n+1} to t_n on
x + t_{n+1} z, with the same (assigned) noise z the student sees; the student matches
its EMA target there, as in CT.
"""

import os

import jax
import ml_collections

from cm import checkpoints, consistency, edm, workdir

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


def load_teacher(config: ml_collections.ConfigDict):
    """(apply_fn, EMA params replicated on the mesh) of the EDM run in `cm.teacher_workdir`."""
    from cm import train  # Setup; imported here to keep the module graph one-way

    teacher_dir = config.cm.teacher_workdir
    if not teacher_dir:
        raise FileNotFoundError("cm.loss=cd needs cm.teacher_workdir: the workdir of a trained "
                                "EDM run (configs/cifar10_edm.py)")
    if not os.path.exists(workdir.config_path(teacher_dir)):
        raise FileNotFoundError(f"teacher workdir {teacher_dir!r} holds no run (no config.json): "
                                "train the EDM teacher there first")
    tcfg = workdir.load_config(teacher_dir)
    if tcfg.cm.loss != "edm":
        raise ValueError(f"the teacher in {teacher_dir!r} was trained with cm.loss="
                         f"{tcfg.cm.loss!r}; distillation needs an EDM (cm.loss=edm) teacher")
    for field in ("image_size", "num_channels"):
        if tcfg.data[field] != config.data[field]:
            raise ValueError(f"teacher data.{field}={tcfg.data[field]} but the student has "
                             f"{config.data[field]}")
    if tcfg.model.num_classes != config.model.num_classes:
        raise ValueError("teacher and student must agree on model.num_classes")
    setup = train.Setup(tcfg)
    ckpt = checkpoints.Checkpointer(teacher_dir)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"teacher workdir {teacher_dir!r} has no checkpoint")
    state = ckpt.restore(setup.abstract_state())
    ckpt.close()
    return setup.apply_fn, state.ema_params[tcfg.sample.ema_index]
