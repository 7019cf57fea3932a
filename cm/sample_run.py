"""`--mode sample`: draws samples from a checkpoint into an `.npz` and a PNG grid."""

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from cm import checkpoints, distributed, sampling, solvers, workdir
from cm.setup import Setup


def _labels(config: ml_collections.ConfigDict, n: int) -> np.ndarray | None:
    """`sample.label` >= 0: that class; -1: a class grid (cycling through the classes)."""
    num_classes = config.model.num_classes
    if num_classes <= 0:
        return None
    if config.sample.label >= num_classes:
        raise ValueError(f"sample.label={config.sample.label} but there are {num_classes} "
                         "classes")
    if config.sample.label >= 0:
        return np.full((n,), config.sample.label, np.int32)
    return sampling.class_grid_labels(n, num_classes)


def sample_from_workdir(run_dir: str, config: ml_collections.ConfigDict | None = None,
                        ) -> str:
    """Samples `sample.n` images with times `sample.ts` from checkpoint `sample.step`.

    Uses `config` if given (it must match the saved run's shapes), else the config
    saved in the workdir. Returns the path of the written `.npz`.
    """
    if config is None:
        config = workdir.load_config(run_dir)
    else:
        workdir.check_compatible(run_dir, config, training=False)
    setup = Setup(config)
    ckpt = checkpoints.Checkpointer(run_dir)
    step = None if config.sample.step < 0 else config.sample.step
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train first")
    state = ckpt.restore(setup.abstract_state(), step)
    step = int(jax.device_get(state.step))
    params = state.ema_params[config.sample.ema_index]
    ts = tuple(config.sample.ts)
    sampler = setup.sampler(ts)
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
    if config.cm.loss in solvers.DIFFUSION_LOSSES:
        name = f"sample_step{step:08d}_{config.sample.solver}{config.sample.steps}"
        if config.sample.solver == "ddim" and config.sample.eta:
            name += f"_eta{config.sample.eta:g}"
        if config.cm.loss == "ddpm" and config.sample.skip != "uniform":
            name += f"_{config.sample.skip}"
    else:
        name = f"sample_step{step:08d}_{len(ts)}step"
    path = os.path.join(out_dir, name + ".npz")
    if not distributed.is_main():  # only process 0 writes
        return path
    np.savez_compressed(path, images=images, ts=np.asarray(ts), step=step)
    sampling.save_grid(images[:64], os.path.join(out_dir, name + ".png"),
                       upscale=max(1, 64 // images.shape[1]))
    logging.info("wrote %d samples to %s", len(images), path)
    return path
