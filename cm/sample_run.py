"""`--mode sample`: draws samples from a checkpoint into an `.npz` and a PNG grid."""

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from cm import config as config_lib
from cm import sampling
from cm.runtime import checkpoints, distributed, workdir
from cm.setup import Setup
from cm.train import check_compatible


def _labels(config: config_lib.Config, n: int) -> np.ndarray | None:
    """`sample.label` >= 0: that class; -1: a class grid (cycling through the classes)."""
    num_classes = config.model.num_classes
    if num_classes <= 0:
        return None
    if config.sample.label >= num_classes:
        raise config_lib.ConfigError(f"sample.label={config.sample.label} but there are "
                                     f"{num_classes} classes")
    if config.sample.label >= 0:
        return np.full((n,), config.sample.label, np.int32)
    return sampling.class_grid_labels(n, num_classes)


def sample(config: Any, run_dir: str) -> str:
    """Samples `sample.n` images from checkpoint `sample.step` with the objective's sampler
    of the `sample` section (`sample.ts` for consistency models, `sample.solver` /
    `sample.steps` for diffusion models).

    Args:
      config: a config (it must match the saved run's shapes and parameterisation), or
        None for the config saved in `run_dir`.
      run_dir: the training workdir.

    Returns:
      The path of the written `.npz`.
    """
    if config is None:
        config = workdir.load_config(run_dir)
    else:
        check_compatible(run_dir, config, training=False)
    setup = Setup(config)
    config = setup.config
    ckpt = checkpoints.Checkpointer(run_dir)
    step = None if config.sample.step < 0 else config.sample.step
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train first")
    state = ckpt.restore(setup.abstract_state(), step)
    step = int(jax.device_get(state.step))
    params = state.ema_params[config.sample.ema_index]
    spec = config.objective.sampling.for_sample_mode(config.cm, config.sample)
    sampler = setup.sampler(spec)
    bs = setup.round_batch(config.sample.batch_size)
    chunks, key = [], jax.random.fold_in(setup.sample_key, step)
    for i in range(-(-config.sample.n // bs)):
        # to_host is a collective across processes: every process samples and gathers.
        chunks.append(distributed.to_host(sampler(params, jax.random.fold_in(key, i), bs,
                                                  _labels(config, bs))))
    images = np.concatenate(chunks)[: config.sample.n]
    ckpt.close()
    out_dir = os.path.join(run_dir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    name = f"sample_step{step:08d}_{spec.tag}"
    path = os.path.join(out_dir, name + ".npz")
    if not distributed.is_main():  # only process 0 writes
        return path
    np.savez_compressed(path, images=images, ts=np.asarray(spec.times), step=step)
    sampling.save_grid(images[:64], os.path.join(out_dir, name + ".png"),
                       upscale=max(1, 64 // images.shape[1]))
    logging.info("wrote %d samples to %s", len(images), path)
    return path
