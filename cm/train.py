"""The training loop: one flat loop with explicit log / sample / checkpoint triggers.

Host: deterministic batches and noise (`cm.data.Batcher`), paired by `cm.pairing`
(in a background thread, or inside the step). Device: the jitted step of
`cm.train_step`. The workdir
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

from cm import (
    checkpoints,
    compile_cache,
    consistency,
    data,
    distributed,
    init_from,
    logs,
    nets,
    pairing,
    preemption,
    run_lock,
    sampling,
    solvers,
    train_step,
    workdir,
)
from cm.setup import Setup, check_labels, frozen_inputs

# What the step reports of the pairing on the device path (assignment.where=device).
DEVICE_DIAGNOSTICS = {"distance_before", "distance_after", "reduction"}


class ConfigError(ValueError):
    """The config cannot run; the message names the field and what it must be."""


def validate(config: ml_collections.ConfigDict) -> None:
    """Config errors that would otherwise surface deep inside a run.

    Raises:
      ConfigError: the first problem found.
    """
    try:
        _validate(config)
    except ConfigError:
        raise
    except ValueError as e:  # the checks of the config sections raise plain ValueErrors
        raise ConfigError(str(e)) from e


def _validate(config: ml_collections.ConfigDict) -> None:
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
    k = t.steps_per_call
    if k < 1:
        raise ValueError(f"training.steps_per_call must be >= 1, got {k}")
    uneven = [name for name in ("n_iters", "log_every", "sample_every", "snapshot_every",
                                "resume_every") if t[name] % k]
    if uneven:
        raise ValueError(f"training.steps_per_call={k}: logs, samples and checkpoints happen "
                         f"between calls, so training.{uneven[0]}={t[uneven[0]]} must be a "
                         f"multiple of {k}")
    if t.keep_snapshots < 1:
        raise ValueError(f"training.keep_snapshots must be >= 1 (the newest snapshot is "
                         f"always kept), got {t.keep_snapshots}")
    guards = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")
    if t.transfer_guard not in guards:
        raise ValueError(f"training.transfer_guard must be one of {guards}, got "
                         f"{t.transfer_guard!r}")
    if t.ema_halflife_kimg < 0:
        raise ValueError(f"training.ema_halflife_kimg must be >= 0, got {t.ema_halflife_kimg}")
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
    pairing.check_config(config.assignment)
    on_host = config.assignment.where == "host"
    pairing.check_knn_memory(  # rows paired at once: the host's, or a device's
        config.assignment, t.batch_size // (jax.process_count() if on_host else n_dev),
        config.data.image_size ** 2 * config.data.num_channels)


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


def diverged_message(step: int, loss: float, ckpt: checkpoints.Checkpointer) -> str:
    """What a run that hit a non-finite loss says: which checkpoints exist, how to go on."""
    settings = ("run the command again with different settings, e.g. a smaller "
                "--config.optim.lr, a longer --config.optim.warmup or another "
                "--config.training.seed (the changed fields are logged)")
    resume, snaps = sorted(ckpt.resume.all_steps()), ckpt.snapshot_steps()
    steps = sorted(set(resume) | set(snaps))
    if not steps:
        return (f"loss is {loss} at step {step}; stopping. No checkpoint was written before "
                f"it in {ckpt.workdir}: {settings}; it starts from scratch.")
    newest = steps[-1]
    text = (f"loss is {loss} at step {step}; stopping. Checkpoints in {ckpt.workdir}: resume "
            f"steps {resume}, snapshots {snaps}. To go on, {settings}; it resumes from step "
            f"{newest}.")
    if len(steps) > 1:
        kind = "resume" if newest in resume else "checkpoints"
        text += (f" Step {newest} may already hold diverging parameters: to resume from step "
                 f"{steps[-2]} instead, first move {os.path.join(ckpt.workdir, kind, str(newest))}"
                 " out of the workdir.")
    return text


def schedule_jumps(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                   step: int) -> list[str]:
    """What a changed `training.n_iters` does at the resume step `step`.

    The CT / iCT curricula N(k), CT's target EMA mu(k) and a decaying learning rate are
    functions of k / n_iters: training on past a run's end (a larger n_iters) moves them
    at once. Returns one line per quantity that moves; none when n_iters is unchanged.
    """
    old_n, new_n = saved.training.n_iters, config.training.n_iters
    if old_n == new_n:
        return []
    jumps = []
    old_cm = consistency.CMConfig.from_config(saved)
    new_cm = consistency.CMConfig.from_config(config)
    if new_cm.loss in ("ct", "ict"):
        a, b = int(old_cm.num_scales(step)), int(new_cm.num_scales(step))
        if a != b:
            jumps.append(f"the {new_cm.loss} curriculum N(k) goes from {a} to {b}")
        a, b = float(old_cm.target_decay(step)), float(new_cm.target_decay(step))
        if a != b:
            jumps.append(f"the target EMA mu(k) from {a:.6g} to {b:.6g}")
    a, b = (train_step.learning_rate(c.optim, c.training.n_iters) for c in (saved, config))
    a, b = (float(lr(step)) if callable(lr) else float(lr) for lr in (a, b))
    if a != b:
        jumps.append(f"the learning rate from {a:.6g} to {b:.6g}")
    return [f"training.n_iters changed from {old_n} to {new_n}: at step {step} {j}"
            for j in jumps]


def check_not_past_end(run_dir: str, n_iters: int) -> None:
    """Refuses a `training.n_iters` below the step the run in `run_dir` has reached.

    The newest checkpoint is read off the folder names (no checkpoint manager), so that
    `main.py` can refuse before it writes anything (even the log) in the workdir.
    """
    newest = max(checkpoints.listed_steps(run_dir), default=0)
    if newest > n_iters:
        raise ConfigError(
            f"the run in {run_dir} is already at step {newest}, past training.n_iters="
            f"{n_iters}; nothing was changed. To train on, set training.n_iters above "
            f"{newest}; to use its checkpoints, --mode eval or --mode sample.")


def train(config: ml_collections.ConfigDict, run_dir: str, stop_after: int | None = None,
          ) -> dict:
    """Trains (or resumes) the run in `run_dir`; returns the last logged metrics.

    Args:
      config: the run's config (`training.n_iters` sets the curricula's length).
      run_dir: the workdir; a checkpoint there means continue.
      stop_after: stop (with a checkpoint) after this step, as a preemption would;
        resuming later continues exactly as the uninterrupted run.

    Raises:
      run_lock.WorkdirLockedError: another trainer holds `run_dir`.
    """
    validate(config)
    with run_lock.hold(run_dir, distributed.is_main()):  # one trainer per workdir
        return _train(config, run_dir, stop_after)


def _train(config: ml_collections.ConfigDict, run_dir: str, stop_after: int | None) -> dict:
    clock, t_start = compile_cache.CompileClock(), time.perf_counter()
    is_main = distributed.is_main()  # writes config.json, metrics, log lines and grids
    changed = workdir.check_compatible(run_dir, config)  # raises before anything is written
    check_not_past_end(run_dir, config.training.n_iters)  # so does this
    saved = workdir.saved_dict(run_dir)
    images, labels = data.load_dataset(data.DataConfig.from_config(config))
    labels = check_labels(config, labels)
    setup = Setup(config)
    frozen, teacher_apply = frozen_inputs(config, setup)  # missing weights fail early
    t = config.training

    ckpt = checkpoints.Checkpointer(run_dir, keep=t.keep_snapshots,
                                    snapshot_every=t.snapshot_every,
                                    resume_every=t.resume_every)
    try:  # restored onto the abstract state: no initialisation to compile and discard
        start, state = ckpt.restore_newest(setup.abstract_state(), set_aside=True)
    except BaseException:
        ckpt.close()
        raise
    if start:
        logging.info("resumed from step %d in %s", start, run_dir)
        if init_from.source(config) is not None:
            logging.info("training.init_from / the CD teacher are ignored: this workdir "
                         "resumes from its own checkpoint")
    else:
        start, state = 0, init_from.initial_state(config, setup) or setup.init_state()
    k = t.steps_per_call
    if start % k or (stop_after is not None and stop_after % k):
        ckpt.close()
        raise ConfigError(f"training.steps_per_call={k} runs steps in groups of {k}, but the "
                          f"run starts at step {start}"
                          + (f" and stops after {stop_after}" if stop_after else "")
                          + f", not a multiple of {k}; nothing was changed")
    n_params = nets.count_params(state.params)
    logging.info("network %s: %s parameters (%.2f M)", config.model.name, f"{n_params:,}",
                 n_params / 1e6)
    if is_main:
        if changed:
            logging.warning("config differs from the saved one in: %s", ", ".join(changed))
            for line in schedule_jumps(ml_collections.ConfigDict(saved), config, start):
                logging.warning("%s", line)
            workdir.record_changes(run_dir, start, saved, config)
        workdir.write_config(run_dir, config)
    writer = logs.MetricWriter(run_dir, resume_step=start) if is_main else None

    pair = pairing.Pairing(config, jax.local_device_count())
    step_fn = train_step.make_train_step(
        setup.apply_fn, setup.cm, setup.tx, train_step.ema_rates(t), setup.mesh,
        device_assign=pair.device_fn, teacher_apply_fn=teacher_apply, steps_per_call=k)
    batcher = data.Batcher(images, t.batch_size, t.seed, jax.process_index(),
                           jax.process_count(), config.data.random_flip, labels=labels)
    logging.info("evaluation EMA rates: %s", ", ".join(f"{r:.6g}" for r in train_step.ema_rates(t)))
    logging.info("dataset %s: %d images of shape %s; global batch %d over %d devices "
                 "(%d processes, %d rows here)", config.data.name, len(images),
                 images.shape[1:], t.batch_size, jax.device_count(), jax.process_count(),
                 batcher.host_batch)

    last = {}
    pending: list[tuple[int, jax.Array]] = []
    window_losses: list[jax.Array] = []

    def check_losses():
        nonlocal pending
        values = jax.device_get([v for _, v in pending])
        for (s, _), v in zip(pending, values, strict=True):
            v = np.atleast_1d(v)  # one call's losses: steps s - len(v) + 1 .. s
            bad = np.flatnonzero(~np.isfinite(v))
            if bad.size:
                ckpt.wait()  # list only checkpoints that are complete
                raise FloatingPointError(
                    diverged_message(s - len(v) + 1 + int(bad[0]), float(v[bad[0]]), ckpt))
        pending = []
        return values

    try:
        place = functools.partial(train_step.shard_batch, mesh=setup.mesh)
        # `training.transfer_guard=disallow` makes any implicit host<->device copy in the
        # loop an error (a hidden per-step sync); explicit ones (device_get) stay allowed.
        with pair.inputs(batcher, start, place, k) as inputs, \
                jax.transfer_guard(t.transfer_guard), preemption.StopSignals() as stop:
            meter = logs.Meter(start, t.n_iters, t.batch_size)
            step = start
            end = t.n_iters if stop_after is None else min(stop_after, t.n_iters)
            while step < end:
                item = next(inputs)  # this call's k batches, paired and on the mesh
                for diagnostics in item["diagnostics"]:  # empty on the device path
                    meter.add(diagnostics)
                state, metrics = step_fn(state, item["batch"], frozen)
                step += k
                if step == start + k and is_main:  # one sync, to say what start-up cost
                    jax.block_until_ready(metrics)
                    c = clock.read()
                    logging.info("first step done %.1f s after start: compiling %.1f s "
                                 "(tracing %.1f s, lowering %.1f s), persistent cache %d "
                                 "hits / %d misses", time.perf_counter() - t_start,
                                 c["compile_s"], c["trace_s"], c["lower_s"],
                                 c["cache_hits"], c["cache_misses"])
                losses = metrics.pop("losses", metrics["loss"])  # [k], or this step's
                pending.append((step, losses))
                window_losses.append(losses)

                if step % t.log_every == 0 or step == t.n_iters:
                    check_losses()
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    # `loss` is this step's loss (reproducible across resumes); `loss_avg`
                    # averages the steps since the previous log line (or the resume).
                    m["loss_avg"] = float(np.mean(np.concatenate(
                        [np.atleast_1d(v) for v in jax.device_get(window_losses)])))
                    window_losses = []
                    rates, diagnostics = meter.read(step, inputs.stats().waited_seconds)
                    # Assignment runs per host: its diagnostics are averaged over hosts
                    # (mean distances exactly; a ratio like `reduction` as a mean of ratios).
                    diagnostics = distributed.mean_over_processes(diagnostics)
                    eta = rates.pop("seconds_left")
                    m.update(rates)
                    m.update(diagnostics)
                    if is_main:
                        extra = "".join(f" {k}={m[k]:.4g}" for k in sorted(
                            diagnostics or DEVICE_DIAGNOSTICS & set(m)))
                        logging.info(
                            "step %d/%d loss=%.5g N=%d mu=%.5f %.1f img/s wait=%.1f%%%s left=%s",
                            step, t.n_iters, m["loss"], m["num_scales"], m["mu"],
                            m["images_per_sec"], 100 * m["input_wait_fraction"], extra,
                            logs.format_duration(eta))
                        writer.write(step, m)
                    last = {"step": step, **m}

                final = step == end
                due = (t.snapshot_every and step % t.snapshot_every == 0) or (
                    t.resume_every and step % t.resume_every == 0)
                if due or final:
                    check_losses()  # never checkpoint a state that saw a NaN
                    ckpt.save(step, state, force=final)
                if stop.should_stop(step):  # SIGTERM / SIGINT: checkpoint this step and exit
                    check_losses()
                    ckpt.save_resume(step, state)
                    ckpt.wait()
                    raise stop.stopped(step, ckpt.workdir)
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
