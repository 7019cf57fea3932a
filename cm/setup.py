"""What a run is built from: `Setup` (network, optimiser, mesh, keys, samplers), the
train step's frozen inputs (LPIPS weights, a teacher) and the teacher.

Used by training, sampling, evaluation, distillation and the benchmarks alike, so it
sits below all of them.
"""

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cm import config as config_lib
from cm import latent, nets, optim, sampling, train_step
from cm.data import DatasetError
from cm.nets import lpips
from cm.objectives import SampleOptions, Sampler
from cm.runtime import checkpoints, distributed, workdir


class Setup:
    """Everything the train and sample modes build from a config (built and checked by
    `cm.config.build`; a `ConfigDict` is built here)."""

    def __init__(self, config: Any):
        self.config = config = config_lib.build(config)
        self.cm = config.cm
        self.objective = config.objective
        self.mesh = distributed.make_mesh()
        self.module = nets.build_model(config)
        self.apply_fn = nets.make_apply_fn(self.module)
        self.tx = optim.make_optimizer(config.optim, config.training.n_iters)
        self.image_shape = config.net_shape  # the images, or their latents
        key = jax.random.PRNGKey(config.training.seed)
        self.replicated = NamedSharding(self.mesh, P())
        # Arguments of the compiled programs, never constants in them (the seed does not
        # change a program), and already where the programs want them: no
        # device-to-device copy at every step or grid.
        self.init_key, self.step_key, self.sample_key = jax.device_put(
            tuple(jax.random.split(key, 3)), self.replicated)
        self._samplers: dict[tuple, object] = {}

    def _make_state(self, key):
        params = nets.init_params(self.module, key, self.config)
        return train_step.init_state(params, self.tx, self.objective.keeps_target,
                                     len(self.config.training.ema_rates))

    def abstract_state(self):
        shapes = jax.eval_shape(self._make_state, self.init_key)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), shapes)

    def init_state(self):
        """The initial state, replicated over the mesh (identical on every process)."""
        # One compiled program instead of one small compile per initializer.
        return jax.jit(self._make_state, out_shardings=self.replicated)(self.init_key)

    def sampler(self, spec: Sampler):
        """The jitted sampler `spec` (an objective's `Sampler`), built once per sampler."""
        if spec.key not in self._samplers:
            self._samplers[spec.key] = sampling.make_sampler(
                self.apply_fn, self.cm, self.mesh, self.image_shape, spec,
                self.config.model.num_classes, decoder=latent.decoder(self.config))
        return self._samplers[spec.key]

    def named_sampler(self, name: str, options: SampleOptions = SampleOptions()) -> Sampler:
        """The objective's sampler `name` ('1step', 'heun18', 'ddim50', ...)."""
        return self.objective.sampling.named(self.cm, name, options)

    def grid_sampler(self) -> Sampler:
        """The sampler of the training grids (one consistency step, or `sample.solver`)."""
        return self.objective.sampling.for_grid(self.cm, self.config.sample)

    def round_batch(self, n: int) -> int:
        d = jax.device_count()
        return -(-n // d) * d


def check_labels(config: Any, labels: np.ndarray | None) -> np.ndarray | None:
    """The labels a class-conditional run trains on (None for an unconditional run)."""
    num_classes = config.model.num_classes
    if num_classes <= 0:
        return None
    if labels is None:
        raise DatasetError(f"model.num_classes={num_classes} but dataset "
                           f"{config.data.name!r} has no labels")
    if isinstance(labels, np.ndarray) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"labels span [{labels.min()}, {labels.max()}] but "
                           f"model.num_classes={num_classes}")
    return labels


def load_teacher(config: Any):
    """(apply_fn, EMA params replicated on the mesh) of the teacher run in
    `cm.teacher_workdir` (its objective must be `config.objective.teacher`)."""
    config = config_lib.build(config)
    teacher_dir, kind = config.cm.teacher_workdir, config.objective.teacher
    if not teacher_dir:
        raise FileNotFoundError(f"cm.loss={config.objective.name} needs cm.teacher_workdir: "
                                f"the workdir of a trained {kind.upper()} run")
    if not os.path.exists(workdir.config_path(teacher_dir)):
        raise FileNotFoundError(f"teacher workdir {teacher_dir!r} holds no run (no config.json): "
                                f"train the {kind.upper()} teacher there first")
    tcfg = config_lib.build(workdir.load_config(teacher_dir))
    if tcfg.objective.name != kind:
        raise ValueError(f"the teacher in {teacher_dir!r} was trained with cm.loss="
                         f"{tcfg.cm.loss!r}; cm.loss={config.objective.name} needs a "
                         f"{kind.upper()} (cm.loss={kind}) teacher")
    for field in ("image_size", "num_channels"):
        if tcfg.data[field] != config.data[field]:
            raise ValueError(f"teacher data.{field}={tcfg.data[field]} but the student has "
                             f"{config.data[field]}")
    if tcfg.model.num_classes != config.model.num_classes:
        raise ValueError("teacher and student must agree on model.num_classes")
    if tcfg.cm.sigma_data != config.cm.sigma_data:  # the teacher step preconditions with it
        raise ValueError(f"the teacher was trained with cm.sigma_data={tcfg.cm.sigma_data} but "
                         f"the student has {config.cm.sigma_data}: its Heun step and the "
                         "student's start from its parameters assume one value; set "
                         f"--config.cm.sigma_data={tcfg.cm.sigma_data}")
    setup = Setup(tcfg)
    ckpt = checkpoints.Checkpointer(teacher_dir)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"teacher workdir {teacher_dir!r} has no checkpoint")
    state = ckpt.restore(setup.abstract_state())
    ckpt.close()
    return setup.apply_fn, state.ema_params[tcfg.sample.ema_index]


def frozen_inputs(setup: Setup) -> tuple[dict, Any]:
    """(the train step's `frozen` inputs, the teacher's apply_fn or None).

    `step_key`: the base key of the step's randomness (from `training.seed`); `teacher`:
    the teacher's EMA parameters (objectives with a teacher); `lpips`: the LPIPS weights
    (`cm.metric=lpips`, from `cm.lpips_vgg_path` / `cm.lpips_lin_path` or the cache
    directory `eval.cache_dir`). All are replicated over the mesh.
    """
    config = setup.config
    frozen, teacher_apply = {"step_key": setup.step_key}, None
    wanted = setup.objective.frozen_inputs(setup.cm)
    if "teacher" in wanted:
        teacher_apply, frozen["teacher"] = load_teacher(config)
        logging.info("distilling from the %s teacher in %s", setup.objective.teacher.upper(),
                     config.cm.teacher_workdir)
    if "lpips" in wanted:
        variables = lpips.load_lpips_variables(config.cm.lpips_vgg_path,
                                               config.cm.lpips_lin_path, config.eval.cache_dir)
        frozen["lpips"] = distributed.replicate(variables, setup.replicated)
        logging.info("loss metric: LPIPS-VGG16 (%s pooling, resize %s)", setup.cm.lpips_pool,
                     setup.cm.lpips_resize or "none")
    return frozen, teacher_apply
