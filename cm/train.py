"""The training loop: restore or initialise, then one flat loop with explicit triggers.

Host: deterministic batches and noise (`cm.data.Batcher`), paired by `cm.pairing` (in a
background thread, or inside the step). Device: the jitted step of `cm.train_step`,
with the objective's loss. The workdir is the resume key: a checkpoint there means
continue. With several processes, every process runs this loop on its slice of each
global batch and takes part in checkpoints and sample grids; only process 0 writes
config, metrics and images.
"""

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from cm import config as config_lib
from cm import data, init_from, latent, nets, objectives, optim, pairing, sampling, train_step
from cm.config import Config, ConfigError
from cm.runtime import (
    checkpoints,
    compile_cache,
    distributed,
    logs,
    preemption,
    run_lock,
    tracking,
    workdir,
)
from cm.setup import Setup, check_labels, frozen_inputs

__all__ = ["ConfigError", "check_compatible", "check_not_past_end", "diverged_message",
           "itstime", "schedule_jumps", "train"]


def itstime(step: int, every: int, final: bool = False) -> bool:
    """Whether a periodic action (every `every` steps; 0 = never) is due at `step`, or
    `final` (the last step of the run) asks for it anyway."""
    return final or (every > 0 and step % every == 0)


def check_compatible(run_dir: str, config: Any, training: bool = True) -> list[str]:
    """`workdir.check_compatible` with the objective table's guarded fields."""
    return workdir.check_compatible(run_dir, config, objectives.guarded_fields, training)


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


def schedule_jumps(saved: Any, config: Any, step: int) -> list[str]:
    """What a changed `training.n_iters` does at the resume step `step`.

    The objective's curriculum N(k) and target EMA mu(k) (`Objective.schedule_jumps`)
    and a decaying learning rate are functions of k / n_iters: training on past a run's
    end (a larger n_iters) moves them at once. Returns one line per quantity that moves;
    none when n_iters is unchanged.
    """
    old, new = config_lib.build(saved), config_lib.build(config)
    old_n, new_n = old.training.n_iters, new.training.n_iters
    if old_n == new_n:
        return []
    jumps = new.objective.schedule_jumps(old.cm, new.cm, step)
    a, b = (optim.lr_at(c.optim, c.training.n_iters, step) for c in (old, new))
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


def train(config: Any, run_dir: str, stop_after: int | None = None) -> dict:
    """Trains (or resumes) the run in `run_dir`; returns the last logged metrics.

    Args:
      config: the run's config (a `ConfigDict`, or a `cm.config.Config`).
      run_dir: the workdir; a checkpoint there means continue.
      stop_after: stop (with a checkpoint) after this step, as a preemption would;
        resuming later continues exactly as the uninterrupted run.

    Raises:
      ConfigError: the config cannot run (checked before anything is written).
      run_lock.WorkdirLockedError: another trainer holds `run_dir`.
    """
    cfg = config_lib.for_training(config)
    with run_lock.hold(run_dir, distributed.is_main()):  # one trainer per workdir
        return _train(cfg, run_dir, stop_after)


@dataclasses.dataclass
class _Run:
    """What the loop works with, made by `_start`."""

    setup: Setup
    state: Any
    start: int
    ckpt: checkpoints.Checkpointer
    frozen: dict
    teacher_apply: Any
    batcher: data.Batcher


def _start(cfg: Config, run_dir: str) -> _Run:
    """Restores the newest checkpoint in `run_dir`, or initialises (from scratch, or from
    `training.init_from` / the objective's teacher); writes `config.json`."""
    changed = check_compatible(run_dir, cfg)  # raises before anything is written
    check_not_past_end(run_dir, cfg.training.n_iters)  # so does this
    saved = workdir.saved_dict(run_dir)
    flipped = None
    if cfg.latent.enabled:  # the latent store is the dataset (cm.latent)
        store = latent.training_data(cfg, run_dir)
        images, labels, flipped = store.latents, store.labels, store.flipped
    else:
        images, labels = data.load_dataset(cfg.data)
    labels = check_labels(cfg, labels)
    setup = Setup(cfg)
    frozen, teacher_apply = frozen_inputs(setup)  # missing weights fail early
    t = cfg.training
    ckpt = checkpoints.Checkpointer(run_dir, keep=t.keep_snapshots,
                                    snapshot_every=t.snapshot_every,
                                    resume_every=t.resume_every)
    try:  # restored onto the abstract state: no initialisation to compile and discard
        start, state = ckpt.restore_newest(setup.abstract_state(), set_aside=True)
        if start:
            logging.info("resumed from step %d in %s", start, run_dir)
            if init_from.source(cfg) is not None:
                logging.info("training.init_from / the teacher are ignored: this workdir "
                             "resumes from its own checkpoint")
        else:
            start, state = 0, init_from.initial_state(cfg, setup) or setup.init_state()
        k = t.steps_per_call
        if start % k:
            raise ConfigError(f"training.steps_per_call={k} runs steps in groups of {k}, but "
                              f"the run starts at step {start}, not a multiple of {k}; nothing "
                              "was changed")
    except BaseException:
        ckpt.close()
        raise
    n_params = nets.count_params(state.params)
    logging.info("network %s: %s parameters (%.2f M); objective %s: %s", cfg.model.name,
                 f"{n_params:,}", n_params / 1e6, cfg.objective.name, cfg.objective.summary)
    cfg.log_notes()
    if distributed.is_main():
        if changed:
            logging.warning("config differs from the saved one in: %s", ", ".join(changed))
            for line in schedule_jumps(ml_collections.ConfigDict(saved), cfg, start):
                logging.warning("%s", line)
            workdir.record_changes(run_dir, start, saved, cfg)
        workdir.write_config(run_dir, cfg)
    batcher = data.Batcher(images, t.batch_size, t.seed, jax.process_index(),
                           jax.process_count(), cfg.data.random_flip, labels=labels,
                           flipped=flipped)
    logging.info("evaluation EMA rates: %s", ", ".join(f"{r:.6g}" for r in t.rates))
    logging.info("dataset %s: %d images of shape %s; global batch %d over %d devices "
                 "(%d processes, %d rows here)", cfg.data.name, len(images), images.shape[1:],
                 t.batch_size, jax.device_count(), jax.process_count(), batcher.host_batch)
    return _Run(setup, state, start, ckpt, frozen, teacher_apply, batcher)


class LossWatch:
    """The losses of the steps since the last check: a non-finite one stops the run
    (with what the workdir holds), and the window's mean for the log line."""

    def __init__(self, ckpt: checkpoints.Checkpointer):
        self.ckpt, self.pending, self.window = ckpt, [], []

    def add(self, step: int, losses: jax.Array) -> None:
        """`losses`: this call's losses, `[k]` for steps step - k + 1 .. step, or one."""
        self.pending.append((step, losses))
        self.window.append(losses)

    def check(self) -> None:
        """Raises FloatingPointError at the first non-finite loss since the last check."""
        values = jax.device_get([v for _, v in self.pending])
        for (s, _), v in zip(self.pending, values, strict=True):
            v = np.atleast_1d(v)
            bad = np.flatnonzero(~np.isfinite(v))
            if bad.size:
                self.ckpt.wait()  # list only checkpoints that are complete
                raise FloatingPointError(
                    diverged_message(s - len(v) + 1 + int(bad[0]), float(v[bad[0]]),
                                     self.ckpt))
        self.pending = []

    def window_mean(self) -> float:
        """The mean loss since the previous call, and starts a new window."""
        mean = float(np.mean(np.concatenate(
            [np.atleast_1d(v) for v in jax.device_get(self.window)])))
        self.window = []
        return mean


def _write_grid(setup: Setup, params, step: int, run_dir: str) -> str | None:
    """Samples a grid; every process computes its shard, process 0 writes the PNG.

    The sampler is sharded over the mesh of all processes, so every process must call
    this (a jitted collective run by process 0 alone would wait forever).

    Returns:
      The PNG's path on process 0, None elsewhere.
    """
    n = setup.round_batch(setup.config.training.n_grid)
    sampler = setup.sampler(setup.grid_sampler())
    num_classes = setup.config.model.num_classes
    labels = sampling.class_grid_labels(n, num_classes) if num_classes > 0 else None
    images = distributed.to_host(sampler(params, setup.sample_key, n, labels))  # [n,H,W,C]
    if not distributed.is_main():
        return None
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    path = os.path.join(run_dir, "samples", f"step_{step:08d}.png")
    upscale = max(1, 64 // images.shape[1])
    sampling.save_grid(images[: setup.config.training.n_grid], path, upscale=upscale)
    return path


def _log_line(step: int, m: dict, diagnostics: dict, n_iters: int, eta: float) -> None:
    names = sorted(diagnostics or pairing.DEVICE_DIAGNOSTICS & set(m))
    extra = "".join(f" {k}={m[k]:.4g}" for k in names)
    logging.info("step %d/%d loss=%.5g N=%d mu=%.5f %.1f img/s wait=%.1f%%%s left=%s",
                 step, n_iters, m["loss"], m["num_scales"], m["mu"], m["images_per_sec"],
                 100 * m["input_wait_fraction"], extra, logs.format_duration(eta))


def _train(cfg: Config, run_dir: str, stop_after: int | None) -> dict:
    clock, t_start = compile_cache.CompileClock(), time.perf_counter()
    is_main = distributed.is_main()  # writes config.json, metrics, log lines and grids
    t, k = cfg.training, cfg.training.steps_per_call
    if stop_after is not None and stop_after % k:
        raise ConfigError(f"training.steps_per_call={k} runs steps in groups of {k}, so the "
                          f"run cannot stop after {stop_after}; nothing was changed")
    run = _start(cfg, run_dir)
    setup, state, step, ckpt = run.setup, run.state, run.start, run.ckpt
    writer = logs.MetricWriter(run_dir, resume_step=step) if is_main else None
    tracker = tracking.tracker(t.wandb, run_dir, cfg.to_dict()) if is_main else None
    pair = pairing.Pairing(cfg.assignment, t.seed, jax.local_device_count(),
                           jax.process_index(), jax.process_count())
    logging.info("pairing: %s", pair.describe(t.batch_size, jax.device_count()))
    step_fn = train_step.make_train_step(
        setup.apply_fn, setup.cm, setup.objective, setup.tx, t.rates, setup.mesh,
        device_assign=pair.device_fn, teacher_apply_fn=run.teacher_apply, steps_per_call=k,
        microbatches=t.microbatch)
    watch, last = LossWatch(ckpt), {}
    end = t.n_iters if stop_after is None else min(stop_after, t.n_iters)
    try:
        place = functools.partial(distributed.shard_batch, mesh=setup.mesh)
        # `training.transfer_guard=disallow` makes any implicit host<->device copy in the
        # loop an error (a hidden per-step sync); explicit ones (device_get) stay allowed.
        with pair.inputs(run.batcher, step, place, k) as inputs, \
                jax.transfer_guard(t.transfer_guard), preemption.StopSignals() as stop:
            meter = logs.Meter(step, t.n_iters, t.batch_size)
            while step < end:
                item = next(inputs)  # this call's k batches, paired and on the mesh
                for diagnostics in item["diagnostics"]:  # empty on the device path
                    meter.add(diagnostics)
                state, metrics = step_fn(state, item["batch"], run.frozen)
                first, step = step == run.start, step + k
                if first and is_main:  # one sync, to say what start-up cost
                    jax.block_until_ready(metrics)
                    logs.log_startup(clock, time.perf_counter() - t_start)
                watch.add(step, metrics.pop("losses", metrics["loss"]))
                final = step == end
                if itstime(step, t.log_every, step == t.n_iters):
                    watch.check()
                    m = {name: float(v) for name, v in jax.device_get(metrics).items()}
                    # `loss` is this step's loss (reproducible across resumes); `loss_avg`
                    # averages the steps since the previous log line (or the resume).
                    m["loss_avg"] = watch.window_mean()
                    rates, diagnostics = meter.read(step, inputs.stats().waited_seconds)
                    # Pairing runs per host: its diagnostics are averaged over hosts
                    # (mean distances exactly; a ratio like `reduction` as a mean of ratios).
                    diagnostics = distributed.mean_over_processes(diagnostics)
                    eta = rates.pop("seconds_left")
                    m.update(rates)
                    m.update(diagnostics)
                    if is_main:
                        _log_line(step, m, diagnostics, t.n_iters, eta)
                        writer.write(step, m)
                        if tracker is not None:
                            tracker.metrics(step, m)
                    last = {"step": step, **m}
                if itstime(step, t.snapshot_every, final) or itstime(step, t.resume_every):
                    watch.check()  # never checkpoint a state that saw a NaN
                    ckpt.save(step, state, force=final)
                if stop.should_stop(step):  # SIGTERM / SIGINT: checkpoint this step and exit
                    watch.check()
                    ckpt.save_resume(step, state)
                    ckpt.wait()
                    raise stop.stopped(step, ckpt.workdir)
                if itstime(step, t.sample_every, final):
                    ema = state.ema_params[cfg.sample.ema_index]
                    path = _write_grid(setup, ema, step, run_dir)  # all processes
                    if path is not None:
                        logging.info("sample grid: %s", path)
                        if tracker is not None:
                            tracker.grid(step, path)
    finally:
        ckpt.wait()  # a failed run still finishes writing its last good checkpoint
        ckpt.close()
        if writer is not None:
            writer.close()
        if tracker is not None:
            tracker.close()
    return last
