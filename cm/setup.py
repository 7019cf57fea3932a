"""What a run is built from: `Setup` (network, optimiser, mesh, keys, samplers), the
train step's frozen inputs (LPIPS weights, a distillation teacher) and the teacher.

Used by training, sampling, evaluation, distillation and the benchmarks alike, so it
sits below all of them.
"""

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cm import checkpoints, consistency, distributed, nets, sampling, solvers, train_step, workdir
from cm.data import DatasetError
from cm.nets import lpips


class Setup:
    """Everything the train and sample modes build from a config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.cm = consistency.CMConfig.from_config(config)
        self.mesh = train_step.make_mesh()
        self.module = nets.build_model(config)
        self.apply_fn = nets.make_apply_fn(self.module)
        self.tx = train_step.make_optimizer(config.optim, config.training.n_iters)
        s, c = config.data.image_size, config.data.num_channels
        self.image_shape = (s, s, c)
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
        return train_step.init_state(params, self.tx, self.cm.loss,
                                     len(self.config.training.ema_rates))

    def abstract_state(self):
        shapes = jax.eval_shape(self._make_state, self.init_key)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), shapes)

    def init_state(self):
        """The initial state, replicated over the mesh (identical on every process)."""
        # One compiled program instead of one small compile per initializer.
        return jax.jit(self._make_state, out_shardings=self.replicated)(self.init_key)

    def sampler(self, ts):
        """The jitted sampler for times `ts`, built once per `ts` (no recompiles per grid).

        For a diffusion run (EDM, DDPM), the solver of `sample.solver` / `sample.steps`
        (and `sample.eta` / `sample.skip` for DDPM) instead.
        """
        if self.cm.loss in solvers.DIFFUSION_LOSSES:  # a solver, not times `ts`
            s = self.config.sample
            return self.ode_sampler(s.solver, s.steps, solvers.Options(s.eta, s.skip))
        ts = tuple(float(t) for t in ts)
        if ts not in self._samplers:
            self._samplers[ts] = sampling.make_sampler(
                self.apply_fn, self.cm, self.mesh, self.image_shape, ts,
                self.config.model.num_classes)
        return self._samplers[ts]

    def ode_sampler(self, solver: str, steps: int,
                    options: solvers.Options = solvers.Options()):
        """The jitted diffusion sampler `solver` (`cm.solvers`: heun | euler for EDM, ddim |
        ddpm for DDPM) with `steps` steps, built once."""
        cache_key = (solver, int(steps), options)
        if cache_key not in self._samplers:
            sample_fn = solvers.make_sample_fn(self.cm, solver, int(steps), options)
            self._samplers[cache_key] = sampling.make_sampler(
                self.apply_fn, self.cm, self.mesh, self.image_shape,
                tuple(float(t) for t in self.ode_times(steps, solver, options)),
                self.config.model.num_classes, sample_fn=sample_fn)
        return self._samplers[cache_key]

    def ode_times(self, steps: int, solver: str = "heun",
                  options: solvers.Options = solvers.Options()) -> np.ndarray:
        """The descending times of a `steps`-step sampler: Karras times ending with 0 (EDM),
        or the timesteps visited (DDPM)."""
        return solvers.times(self.cm, solver, int(steps), options)

    def round_batch(self, n: int) -> int:
        d = jax.device_count()
        return -(-n // d) * d


def check_labels(config: ml_collections.ConfigDict, labels: np.ndarray | None,
                 ) -> np.ndarray | None:
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


def load_teacher(config: ml_collections.ConfigDict):
    """(apply_fn, EMA params replicated on the mesh) of the EDM run in `cm.teacher_workdir`."""
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


def frozen_inputs(config: ml_collections.ConfigDict, setup: Setup):
    """(the train step's `frozen` inputs, the teacher's apply_fn or None).

    `step_key`: the base key of the step's randomness (from `training.seed`); `teacher`:
    the EDM teacher's EMA parameters (`cm.loss=cd`); `lpips`: the LPIPS weights
    (`cm.metric=lpips`, from `cm.lpips_vgg_path` / `cm.lpips_lin_path` or the cache
    directory `eval.cache_dir`). All are replicated over the mesh.
    """
    frozen, teacher_apply = {"step_key": setup.step_key}, None
    if setup.cm.loss == "cd":
        teacher_apply, frozen["teacher"] = load_teacher(config)
        logging.info("distilling from the EDM teacher in %s", config.cm.teacher_workdir)
    if setup.cm.uses_lpips:
        variables = lpips.load_lpips_variables(config.cm.lpips_vgg_path,
                                               config.cm.lpips_lin_path, config.eval.cache_dir)
        frozen["lpips"] = distributed.replicate(variables, setup.replicated)
        logging.info("loss metric: LPIPS-VGG16 (%s pooling, resize %s)", setup.cm.lpips_pool,
                     setup.cm.lpips_resize or "none")
    return frozen, teacher_apply
