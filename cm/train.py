"""The training loop: one flat loop with explicit log / sample / checkpoint triggers.

Host: deterministic batches and noise (`cm.data.Batcher`), paired by the assignment
stage in a background thread. Device: the jitted step of `cm.train_step`. The workdir
is the resume key: a checkpoint there means continue. With several processes, every
process runs this loop on its slice of each global batch and takes part in
checkpoints and sample grids; only process 0 writes config, metrics and images.
"""

import functools
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import assignment
from cm import (
    checkpoints,
    consistency,
    data,
    distributed,
    input_pipeline,
    logs,
    model,
    sampling,
    solvers,
    train_step,
    workdir,
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Config errors that would otherwise surface deep inside a run."""
    t = config.training
    n_dev = jax.device_count()
    if t.batch_size <= 0 or t.batch_size % n_dev:
        raise ValueError(f"training.batch_size={t.batch_size} must be a positive multiple of "
                         f"the {n_dev} devices")
    for name in ("n_iters", "log_every", "sample_every", "snapshot_every", "resume_every"):
        if t[name] < 0:
            raise ValueError(f"training.{name} must be >= 0, got {t[name]}")
    if t.log_every == 0:
        raise ValueError("training.log_every must be positive")
    guards = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")
    if t.transfer_guard not in guards:
        raise ValueError(f"training.transfer_guard must be one of {guards}, got "
                         f"{t.transfer_guard!r}")
    if not t.ema_rates or any(not 0 <= r < 1 for r in t.ema_rates):
        raise ValueError(f"training.ema_rates must be rates in [0, 1), got {t.ema_rates}")
    if not 0 <= config.sample.ema_index < len(t.ema_rates):
        raise ValueError(f"sample.ema_index={config.sample.ema_index} but there are "
                         f"{len(t.ema_rates)} EMA rates")
    cm_cfg = consistency.CMConfig.from_config(config)  # checks the cm section
    if cm_cfg.loss in solvers.DIFFUSION_LOSSES:
        if cm_cfg.metric == "lpips":
            logging.warning("cm.metric=lpips is ignored: diffusion training uses its l2 loss")
        s = config.sample
        solvers.check(cm_cfg, s.solver, s.steps, solvers.Options(s.eta, s.skip))
    if cm_cfg.uses_lpips:
        if config.data.num_channels != 3:
            raise ValueError(f"cm.metric=lpips needs RGB images; data.num_channels="
                             f"{config.data.num_channels}")
        if not cm_cfg.lpips_resize and config.data.image_size < 16:
            raise ValueError("cm.metric=lpips with cm.lpips_resize=0 needs images of at "
                             f"least 16x16 (VGG16 pools 4 times), got {config.data.image_size}")
    if config.assignment.within_class and config.model.num_classes <= 0:
        raise ValueError("assignment.within_class needs a class-conditional model "
                         "(model.num_classes > 0)")
    input_pipeline.check_assignment_config(config.assignment)


def frozen_inputs(config: ml_collections.ConfigDict, setup: "Setup"):
    """(the train step's `frozen` inputs, the teacher's apply_fn or None).

    `teacher`: the EDM teacher's EMA parameters (`cm.loss=cd`); `lpips`: the LPIPS
    weights (`cm.metric=lpips`, from `cm.lpips_vgg_path` / `cm.lpips_lin_path` or the
    cache directory `eval.cache_dir`). Both are replicated over the mesh.
    """
    frozen, teacher_apply = {}, None
    if setup.cm.loss == "cd":
        from cm import distill

        teacher_apply, frozen["teacher"] = distill.load_teacher(config)
        logging.info("distilling from the EDM teacher in %s", config.cm.teacher_workdir)
    if setup.cm.uses_lpips:
        from cm import lpips

        variables = lpips.load_lpips_variables(config.cm.lpips_vgg_path,
                                               config.cm.lpips_lin_path, config.eval.cache_dir)
        frozen["lpips"] = distributed.replicate(variables, setup.replicated)
        logging.info("loss metric: LPIPS-VGG16 (%s pooling, resize %s)", setup.cm.lpips_pool,
                     setup.cm.lpips_resize or "none")
    return frozen, teacher_apply


def check_labels(config: ml_collections.ConfigDict, labels: np.ndarray | None,
                 ) -> np.ndarray | None:
    """The labels a class-conditional run trains on (None for an unconditional run)."""
    num_classes = config.model.num_classes
    if num_classes <= 0:
        return None
    if labels is None:
        raise data.DatasetError(f"model.num_classes={num_classes} but dataset "
                                f"{config.data.name!r} has no labels")
    if isinstance(labels, np.ndarray) and (labels.min() < 0 or labels.max() >= num_classes):
        raise data.DatasetError(f"labels span [{labels.min()}, {labels.max()}] but "
                                f"model.num_classes={num_classes}")
    return labels


class Setup:
    """Everything the train and sample modes build from a config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.cm = consistency.CMConfig.from_config(config)
        self.mesh = train_step.make_mesh()
        self.module = model.build_model(config)
        self.apply_fn = model.make_apply_fn(self.module)
        self.tx = train_step.make_optimizer(config.optim)
        s, c = config.data.image_size, config.data.num_channels
        self.image_shape = (s, s, c)
        key = jax.random.PRNGKey(config.training.seed)
        self.init_key, self.step_key, sample_key = jax.random.split(key, 3)
        self.replicated = NamedSharding(self.mesh, P())
        # Already where the sampler wants it: no device-to-device copy at every grid.
        self.sample_key = jax.device_put(sample_key, self.replicated)
        self._samplers: dict[tuple[float, ...], object] = {}

    def abstract_state(self):
        def make():
            params = model.init_params(self.module, self.init_key, self.config)
            return train_step.init_state(params, self.tx, self.cm.loss,
                                         len(self.config.training.ema_rates))

        shapes = jax.eval_shape(make)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), shapes)

    def init_state(self):
        """The initial state, replicated over the mesh (identical on every process)."""
        def make():
            params = model.init_params(self.module, self.init_key, self.config)
            return train_step.init_state(params, self.tx, self.cm.loss,
                                         len(self.config.training.ema_rates))

        # One compiled program instead of one small compile per initializer.
        return jax.jit(make, out_shardings=self.replicated)()

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


def _write_grid(setup: Setup, params, step: int, run_dir: str) -> str | None:
    """Samples a grid; every process computes its shard, process 0 writes the PNG.

    The sampler is sharded over the mesh of all processes, so every process must call
    this (a jitted collective run by process 0 alone would wait forever).

    Returns:
      The PNG's path on process 0, None elsewhere.
    """
    n = setup.round_batch(setup.config.training.n_grid)
    sampler = setup.sampler((setup.cm.sigma_max,))
    num_classes = setup.config.model.num_classes
    labels = sampling.class_grid_labels(n, num_classes) if num_classes > 0 else None
    images = distributed.to_host(sampler(params, setup.sample_key, n, labels))  # [n,H,W,C]
    if not distributed.is_main():
        return None
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    path = os.path.join(run_dir, "samples", f"step_{step:08d}.png")
    upscale = max(1, 64 // setup.image_shape[0])
    sampling.save_grid(images[: setup.config.training.n_grid], path, upscale=upscale)
    return path


def train(config: ml_collections.ConfigDict, run_dir: str, stop_after: int | None = None,
          ) -> dict:
    """Trains (or resumes) the run in `run_dir`; returns the last logged metrics.

    Args:
      config: the run's config (`training.n_iters` sets the curricula's length).
      run_dir: the workdir; a checkpoint there means continue.
      stop_after: stop (with a checkpoint) after this step, as a preemption would;
        resuming later continues exactly as the uninterrupted run.
    """
    validate(config)
    is_main = distributed.is_main()  # writes config.json, metrics, log lines and grids
    changed = workdir.check_compatible(run_dir, config)  # raises before anything is written
    images, labels = data.load_dataset(data.DataConfig.from_config(config))
    labels = check_labels(config, labels)
    setup = Setup(config)
    frozen, teacher_apply = frozen_inputs(config, setup)  # missing weights fail early
    t = config.training

    ckpt = checkpoints.Checkpointer(run_dir, keep=t.keep_snapshots,
                                    snapshot_every=t.snapshot_every,
                                    resume_every=t.resume_every)
    start = ckpt.latest_step() or 0
    if start:  # restored onto the abstract state: no initialisation to compile and discard
        state = ckpt.restore(setup.abstract_state())
        logging.info("resumed from step %d in %s", start, run_dir)
    else:
        state = setup.init_state()
    n_params = model.count_params(state.params)
    logging.info("network %s: %s parameters (%.2f M)", config.model.name, f"{n_params:,}",
                 n_params / 1e6)
    if is_main:
        if changed:
            logging.warning("config differs from the saved one in: %s", ", ".join(changed))
        workdir.write_config(run_dir, config)
    writer = logs.MetricWriter(run_dir, resume_step=start) if is_main else None

    step_fn = train_step.make_train_step(
        setup.apply_fn, setup.cm, setup.tx, tuple(t.ema_rates), setup.mesh, setup.step_key,
        device_assign=input_pipeline.device_assign_fn(config.assignment),
        teacher_apply_fn=teacher_apply)
    batcher = data.Batcher(images, t.batch_size, t.seed, jax.process_index(),
                           jax.process_count(), config.data.random_flip, labels=labels)
    logging.info("dataset %s: %d images of shape %s; global batch %d over %d devices "
                 "(%d processes, %d rows here)", config.data.name, len(images),
                 images.shape[1:], t.batch_size, jax.device_count(), jax.process_count(),
                 batcher.host_batch)

    last = {}
    pending: list[tuple[int, jax.Array]] = []
    window_losses: list[jax.Array] = []
    last_good = start

    def check_losses():
        nonlocal pending
        values = jax.device_get([v for _, v in pending])
        for (s, _), v in zip(pending, values, strict=True):
            if not np.isfinite(v):
                raise FloatingPointError(
                    f"loss is {float(v)} at step {s}; stopping. The last good checkpoint "
                    f"(step {last_good}) is kept in {run_dir}.")
        pending = []
        return values

    try:
        place = functools.partial(train_step.shard_batch, mesh=setup.mesh)
        # `training.transfer_guard=disallow` makes any implicit host<->device copy in the
        # loop an error (a hidden per-step sync); explicit ones (device_get) stay allowed.
        with input_pipeline.make_input(config, batcher, start, jax.local_device_count(),
                                       place) as inputs, jax.transfer_guard(t.transfer_guard):
            t_log, waited_log = time.perf_counter(), 0.0
            diag_acc: dict[str, list[float]] = {}
            step = prev_log = start
            end = t.n_iters if stop_after is None else min(stop_after, t.n_iters)
            while step < end:
                t0 = time.perf_counter()
                batch, diagnostics = assignment.split_diagnostics(next(inputs))  # on device
                waited_log += time.perf_counter() - t0
                for k, v in diagnostics.items():
                    diag_acc.setdefault(k, []).append(float(v))
                state, metrics = step_fn(state, batch, frozen)
                step += 1
                pending.append((step, metrics["loss"]))
                window_losses.append(metrics["loss"])

                if step % t.log_every == 0 or step == t.n_iters:
                    check_losses()
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    window = jax.device_get(window_losses)
                    # `loss` is this step's loss (reproducible across resumes); `loss_avg`
                    # averages the steps since the previous log line (or the resume).
                    m["loss_avg"] = float(np.mean(window))
                    window_losses = []
                    wall = time.perf_counter() - t_log
                    m["steps_per_sec"] = (step - prev_log) / wall
                    m["images_per_sec"] = m["steps_per_sec"] * t.batch_size
                    m["input_wait_fraction"] = waited_log / wall
                    # Assignment runs per host: its diagnostics are averaged over hosts
                    # (mean distances exactly; a ratio like `reduction` as a mean of ratios).
                    m.update(distributed.mean_over_processes(
                        {k: float(np.mean(v)) for k, v in diag_acc.items()}))
                    eta = (t.n_iters - step) / max(m["steps_per_sec"], 1e-9)
                    if is_main:
                        extra = "".join(f" {k}={m[k]:.4g}" for k in sorted(diag_acc))
                        logging.info(
                            "step %d/%d loss=%.5g N=%d mu=%.5f %.1f img/s wait=%.1f%%%s left=%s",
                            step, t.n_iters, m["loss"], m["num_scales"], m["mu"],
                            m["images_per_sec"], 100 * m["input_wait_fraction"], extra,
                            logs.format_duration(eta))
                        writer.write(step, m)
                    last = {"step": step, **m}
                    t_log, waited_log, diag_acc = time.perf_counter(), 0.0, {}
                    prev_log = step

                final = step == end
                due = (t.snapshot_every and step % t.snapshot_every == 0) or (
                    t.resume_every and step % t.resume_every == 0)
                if due or final:
                    check_losses()  # never checkpoint a state that saw a NaN
                    if ckpt.save(step, state, force=final):
                        last_good = step
                if (t.sample_every and step % t.sample_every == 0) or final:
                    ema = state.ema_params[config.sample.ema_index]
                    path = _write_grid(setup, ema, step, run_dir)  # all processes
                    if path is not None:
                        logging.info("sample grid: %s", path)
    finally:
        ckpt.wait()  # a failed run still finishes writing its last good checkpoint
        ckpt.close()
        if writer is not None:
            writer.close()
    return last
