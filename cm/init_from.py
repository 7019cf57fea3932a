"""Starting a new run from another run's parameters (fine-tuning, and CD from its teacher).

`training.init_from=DIR` (checkpoint `training.init_step`, -1 = the latest) copies the
online parameters of the run in DIR into a new run, and its CT target and evaluation
EMAs where it has them (else the online parameters); the optimiser starts fresh at step
0. For an objective that seeds from its teacher (`Objective.seeds_from_teacher`: CD) an
empty `init_from` means the teacher (`cm.teacher_workdir`), as the OpenAI JAX code's
`finetune=True` does (`jcm/losses.py: get_loss_fn`): the student's online parameters are
the teacher's raw (online) parameters, its target starts equal to them, and its
evaluation EMAs are the teacher's EMA (`sample.ema_index`). (The OpenAI PyTorch code
copies one file, the teacher's EMA, into all three; we follow the JAX code, whose
CIFAR-10 results the paper reports. Until 2026-12-06 all three came from the EMA.)
`init_from=none` trains the student from scratch.

Shapes must match parameter by parameter; the one exception is a class-conditional
fine-tune of an unconditional run, whose new parameters (the label embedding) keep
their initial values and are listed in the log.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from cm import config as config_lib
from cm import train_step
from cm.runtime import checkpoints, distributed, workdir
from cm.setup import Setup

PyTree = train_step.PyTree
NONE = "none"


class InitFromError(ValueError):
    """The run to start from cannot seed this one; the message says why."""


def source(config: Any) -> tuple[str, str] | None:
    """(workdir to start from, "run" | "teacher"), or None for a fresh initialisation."""
    config = config_lib.build(config)
    init_from = config.training.init_from
    if init_from == NONE:
        return None
    if init_from:
        return init_from, "run"
    if config.objective.seeds_from_teacher and config.cm.teacher_workdir:
        return config.cm.teacher_workdir, "teacher"
    return None


def merge_params(fresh: PyTree, loaded: PyTree, allow_new: bool, where: str,
                 ) -> tuple[PyTree, list[str]]:
    """`fresh` with every leaf that `loaded` has replaced by `loaded`'s.

    Args:
      fresh: this run's initial parameters (numpy).
      loaded: the other run's parameters (numpy).
      allow_new: leaves of `fresh` absent from `loaded` keep their initial values
        (a class-conditional fine-tune); otherwise they are an error.
      where: the other run, for messages.

    Returns:
      (merged parameters, names of the leaves that kept their initial values).
    """
    f = traverse_util.flatten_dict(fresh, sep="/")
    g = traverse_util.flatten_dict(loaded, sep="/")
    extra = sorted(set(g) - set(f))
    if extra:
        raise InitFromError(f"{where} has parameter {extra[0]!r} that this model lacks "
                            f"({len(extra)} such): a different architecture")
    new = sorted(set(f) - set(g))
    if new and not allow_new:
        raise InitFromError(f"this model has parameter {new[0]!r} that {where} lacks "
                            f"({len(new)} such): a different architecture")
    for name in sorted(set(f) & set(g)):
        if f[name].shape != g[name].shape:
            raise InitFromError(f"parameter {name!r} has shape {tuple(g[name].shape)} in "
                                f"{where} but {tuple(f[name].shape)} here")
    merged = {k: np.asarray(g[k], f[k].dtype) if k in g else f[k] for k in f}
    return traverse_util.unflatten_dict(merged, sep="/"), new


def _restore(run_dir: str, step: int) -> tuple[ml_collections.ConfigDict, PyTree, int]:
    cfg = workdir.load_config(run_dir)  # raises with the path if there is no run
    ckpt = checkpoints.Checkpointer(run_dir)
    try:
        steps = sorted(set(ckpt.snapshot_steps()) | set(ckpt.resume.all_steps()))
        if not steps:
            raise InitFromError(f"{run_dir!r} has no checkpoint to start from")
        step = steps[-1] if step < 0 else step
        if step not in steps:
            raise InitFromError(f"{run_dir!r} has no checkpoint at step {step}; it has {steps}")
        state = ckpt.restore(Setup(cfg).abstract_state(), step)
    finally:
        ckpt.close()
    return cfg, jax.device_get(state), step


def initial_state(config: Any, setup: Setup):
    """The new run's state seeded from `source(config)`, replicated; None if there is none."""
    found = source(config)
    if found is None:
        return None
    run_dir, kind = found
    try:
        src_cfg, src, step = _restore(run_dir, config.training.init_step)
    except FileNotFoundError as e:
        raise InitFromError(f"cannot start from {run_dir!r}: {e}") from e
    for field in ("image_size", "num_channels"):
        if src_cfg.data[field] != config.data[field]:
            raise InitFromError(f"{run_dir!r} has data.{field}={src_cfg.data[field]} but this "
                                f"run has {config.data[field]}")
    conditional_finetune = src_cfg.model.num_classes == 0 < config.model.num_classes
    if src_cfg.model.num_classes not in (0, config.model.num_classes):
        raise InitFromError(f"{run_dir!r} has model.num_classes={src_cfg.model.num_classes} "
                            f"but this run has {config.model.num_classes}")
    fresh = jax.device_get(setup.init_state())
    where = f"{run_dir!r} (step {step})"

    def merge(tree):
        merged, _ = merge_params(fresh.params, tree, conditional_finetune, where)
        return merged

    if kind == "teacher":  # online and target from the raw parameters, EMAs from the EMA
        params, new = merge_params(fresh.params, src.params, conditional_finetune, where)
        target = params if fresh.target_params is not None else None
        ema = merge(src.ema_params[src_cfg.sample.ema_index])
        emas = tuple(ema for _ in fresh.ema_params)
    else:
        params, new = merge_params(fresh.params, src.params, conditional_finetune, where)
        target = None
        if fresh.target_params is not None:
            target = merge(src.target_params) if src.target_params is not None else params
        emas = tuple(merge(src.ema_params[i]) if i < len(src.ema_params) else params
                     for i in range(len(fresh.ema_params)))
    n_ema = len(config.training.ema_rates)
    state = train_step.init_state(params, setup.tx, setup.objective.keeps_target, n_ema)
    state = state.replace(target_params=target, ema_params=emas)
    what = ("the teacher's online (student and target) and EMA parameters" if kind == "teacher"
            else "the online, target and EMA parameters of the run")
    logging.info("initialised from %s in %s at step %d (fresh optimiser, step 0)", what,
                 run_dir, step)
    if new:
        logging.info("new parameters, initialised here (%d): %s", len(new), ", ".join(new))
    return distributed.replicate(state, setup.replicated)
