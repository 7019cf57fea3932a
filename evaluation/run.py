"""`--mode eval` and `--mode fid_stats`: FID / IS of a run's checkpoints, in resumable rounds.

For each chosen checkpoint and sampler, `eval.n_samples` images are drawn in rounds of
`eval.batch_size` with noise keys fixed by (seed, step, sampler, round); each finished
round updates a progress file in `<workdir>/eval/`, so an interrupted evaluation resumes
at the next round and ends with exactly the numbers of an uninterrupted one. Results go
to `<workdir>/eval.jsonl`, one row per checkpoint and sampler.
"""

from __future__ import annotations

import math
import os
import re
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cm import config as config_lib
from cm import data
from cm.objectives import SampleOptions
from cm.runtime import checkpoints, tracking, workdir
from cm.runtime.views import EvalConfig, view
from cm.setup import Setup
from evaluation import features as features_lib
from evaluation import fid
from evaluation.progress import (
    EVAL_DIR,
    RESULTS,
    Progress,
    append_row,
    progress_dirs,
    read_results,
    row_key,
)

__all__ = ["EVAL_DIR", "RESULTS", "evaluate", "progress_dirs", "read_results",
           "reference_stats", "round_features", "round_key", "select_steps"]

IS_SPLITS = 10
_EVAL_TAG = 0x6576616C  # separates the evaluation noise from the training run's sample keys


def feature_options(ev: EvalConfig, batch_size: int | None = None) -> features_lib.Options:
    """Extractor options; `batch_size` (images per forward pass) defaults to eval's."""
    return features_lib.Options(ev.inception_path, ev.cache_dir, batch_size or ev.batch_size,
                                ev.fashion_weights)


# ----------------------------------------------------------------------------------------
# Which checkpoints.

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def select_steps(spec: str, snapshots: Sequence[int], available: Sequence[int]) -> list[int]:
    """The checkpoint steps chosen by `eval.steps`, ascending.

    `spec` is '' (every kept snapshot) or a comma-separated list of items: 'latest' (the
    newest checkpoint, snapshot or resume), 'N' (the checkpoint of step N), 'N-M' (the
    snapshots with N <= step <= M, at least one). E.g. '1000', '1000-5000',
    '1000,3000-9000,latest'.

    Args:
      spec: the `eval.steps` string.
      snapshots: steps of the kept snapshots.
      available: every restorable step (snapshots and the resume checkpoint).

    Raises:
      ValueError: a malformed item, a step that has no checkpoint, or an empty choice.
    """
    snapshots, available = sorted(set(snapshots)), sorted(set(available) | set(snapshots))
    spec = str(spec).strip()
    if not spec:
        if not snapshots:
            raise ValueError(f"no snapshots to evaluate (checkpoints: {available}); "
                             "set eval.steps, e.g. 'latest'")
        return snapshots
    chosen: set[int] = set()
    for item in (s.strip() for s in spec.split(",")):
        if item == "latest":
            if not available:
                raise ValueError("eval.steps='latest' but there is no checkpoint")
            chosen.add(available[-1])
        elif item.isdigit():
            if int(item) not in available:
                raise ValueError(f"eval.steps: no checkpoint at step {item}; there are "
                                 f"{available}")
            chosen.add(int(item))
        elif m := _RANGE.match(item):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError(f"eval.steps: empty range {item!r} (start > end)")
            inside = [s for s in snapshots if lo <= s <= hi]
            if not inside:
                raise ValueError(f"eval.steps: no snapshot in {item!r}; snapshots: {snapshots}")
            chosen.update(inside)
        else:
            raise ValueError(f"eval.steps={spec!r}: bad item {item!r}; expected '', 'latest', "
                             "'N', 'N-M' or a comma-separated list of these")
    return sorted(chosen)


# ----------------------------------------------------------------------------------------
# Rounds: noise keys, sampling, features.


def round_key(base: jax.Array, step: int, sampler: str, round_index: int) -> jax.Array:
    """The noise key of one round: a function of (base key, step, sampler name, round)."""
    key = jax.random.fold_in(base, _EVAL_TAG)
    key = jax.random.fold_in(key, step)
    key = jax.random.fold_in(key, zlib.crc32(sampler.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, round_index)


def _host_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch sharded over the ('data',) mesh, in global order."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _gather(a: np.ndarray | None) -> np.ndarray | None:
    """Concatenates every process's rows (process order = row order of the mesh)."""
    if a is None or jax.process_count() == 1:
        return a
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def round_features(sampler: Callable, params, key: jax.Array, batch: int, count: int,
                   features: features_lib.Features, nfe: list[float] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Draws `batch` images and returns the features (and logits) of the first `count`;
    with `nfe` (a list), appends this batch's network calls per image (adaptive samplers)."""
    if nfe is None:
        images = sampler(params, key, batch)  # uint8 [batch, H, W, C], sharded over 'data'
    else:
        images, calls = sampler.with_nfe(params, key, batch)
        calls = float(jax.device_get(calls))
        if not np.isfinite(calls):
            raise FloatingPointError("the adaptive sampler did not reach t = 0 within its "
                                     "step limit (a diverging model?); this round is not used")
        nfe.append(calls)
    feats, logits = features.extract(_host_rows(images))
    feats, logits = _gather(feats), _gather(logits)
    return feats[:count], (None if logits is None else logits[:count])


# ----------------------------------------------------------------------------------------
# The modes.


def _eval_settings(saved: config_lib.Config, config: Any) -> EvalConfig:
    """The saved run's `eval` section, replaced by `config.eval` when a config is given.

    Everything else (data, model, seed, `sample.ema_index`) always comes from the
    saved config: it describes the checkpoints. Other differences are logged. A given
    `eval.samplers` left at base's value that the run's objective cannot use takes the
    objective's default (logged); one set to a sampler it cannot use is an error.
    """
    if config is None:
        return saved.eval
    given = config_lib.build(config) if not isinstance(config, config_lib.Config) else config
    old, new = saved.to_dict(), given.to_dict()
    for d in (old, new):
        d.pop("eval", None)
    ignored = workdir.diff(old, new)
    if ignored:
        logging.warning("--mode eval uses only the eval section of the given config; the "
                        "saved run's values stand for: %s", ", ".join(ignored))
    base = config_lib.base_views()
    _, ev, notes = saved.objective.sampling.resolve(
        saved.cm, saved.sample, view(EvalConfig, given.eval), base["sample"],
        base["eval"])
    for line in notes:
        logging.warning("--mode eval: %s", line)
    saved.objective.sampling.check_eval(saved.cm, ev)
    return ev


def reference_stats(config: Any, run_dir: str | None = None) -> str:
    """`--mode fid_stats`: computes (or finds) the reference statistics of the data split.

    The statistics of `data.split` of the configured dataset, with the features of
    `eval.features`, go to `eval.stats_path` or the cache default (see
    `features.reference_path`); an existing file is reused.

    Args:
      config: a run config (its `data` and `eval` sections are used).
      run_dir: the workdir of the command (holds only its log).

    Returns:
      The path of the statistics file.
    """
    del run_dir  # main writes its log there; the statistics are shared across runs
    config = config_lib.build(config)
    ev, data_cfg = config.eval, config.data
    feats = features_lib.make_features(ev.features, data_cfg, feature_options(ev))
    path = features_lib.reference_path(data_cfg, feats.tag, ev.stats_path, ev.cache_dir)
    ref = features_lib.ensure_reference(data_cfg, feats, path, chunk=max(ev.batch_size, 1000))
    logging.info("reference statistics of %s/%s: %d images, %s features, in %s",
                 data_cfg.name, data_cfg.split, ref.n or -1, feats.kind, path)
    return path


def evaluate(config: Any, run_dir: str, *, max_rounds: int | None = None) -> list[dict]:
    """`--mode eval`: FID (or `fd_pixels`) and IS of the run's checkpoints, one row each.

    Reads the config saved in `run_dir`; a given `config` contributes only its `eval`
    section (see `_eval_settings`). For each step of `eval.steps` and each sampler of
    `eval.samplers` (the run's objective's samplers by name: '1step' and '2step' for
    consistency models, 'heun18' / 'euler50' for EDM runs, 'ddim50' with `eval.eta` and
    `eval.skip` / 'ddpm1000' for DDPM runs), draws `eval.n_samples` images with the EMA
    parameters `sample.ema_index`, in rounds of `eval.batch_size` (rounded up to a
    multiple of the device count), and appends a row to `<run_dir>/eval.jsonl`:
    `{"step", "sampler", "ts", "nfe", "n", "metric", <metric>: distance, "is", "is_std",
    "ema"}` (`ts`: the times the sampler visits; `ema`: the rate of the EMA parameters
    sampled, `training.ema_rates[sample.ema_index]`; rows written before 2026-11-30 lack
    it) with metric 'fid' (Inception features) or 'fd_pixels' (pixels; "is" is null),
    and `eta` for samplers that read it. Rows already there (same step, sampler, times,
    n, metric and eta) are not recomputed.

    Args:
      config: None, or a config whose `eval` section replaces the saved one.
      run_dir: a training workdir.
      max_rounds: stop after computing this many rounds in this call, as an
        interruption would (tests, time-limited jobs); the next call resumes.

    Returns:
      The rows of the chosen (step, sampler) pairs that are complete, in order.
    """
    saved = config_lib.build(workdir.load_config(run_dir))
    ev = _eval_settings(saved, config)
    data_cfg = saved.data
    ckpt = checkpoints.Checkpointer(run_dir)
    tracker = None
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}: train first")
        if jax.process_index() == 0:  # the training run's W&B run, when it has one
            tracker = tracking.tracker(saved.training.wandb, run_dir, saved.to_dict())
        steps = select_steps(ev.steps, ckpt.snapshot_steps(),
                             list(ckpt.snapshots.all_steps()) + list(ckpt.resume.all_steps()))
        setup = Setup(saved)
        batch = setup.round_batch(ev.batch_size)
        feats = features_lib.make_features(ev.features, data_cfg, feature_options(ev, batch))
        ref_path = features_lib.reference_path(data_cfg, feats.tag, ev.stats_path,
                                               ev.cache_dir)
        ref = features_lib.ensure_reference(data_cfg, feats, ref_path,
                                            chunk=max(ev.batch_size, 1000))
        if saved.latent.enabled:  # the autoencoder's own floor, once per store
            row = reconstruction_row(saved, run_dir, feats, ref, ev.n_samples, batch)
            if row is not None and tracker is not None:
                tracker.eval_row(row)
        options = SampleOptions.of_eval(ev, saved.sample)
        specs = {s: setup.named_sampler(s, options) for s in ev.samplers}
        samplers = {s: setup.sampler(spec) for s, spec in specs.items()}
        ts_of = {s: spec.times for s, spec in specs.items()}
        eta_of = {s: spec.eta for s, spec in specs.items()}  # part of a row's identity
        clip_of = {s: spec.clip_denoised for s, spec in specs.items()}  # so is the clip
        done = {row_key(r): r for r in read_results(run_dir)}
        budget = [math.inf if max_rounds is None else max_rounds]
        rows: list[dict] = []
        logging.info("evaluating steps %s with samplers %s: %d samples in rounds of %d, "
                     "%s features vs %s", steps, list(ev.samplers), ev.n_samples, batch,
                     feats.kind, ref_path)
        for step in steps:
            keys = {s: (step, s, ev.n_samples, feats.metric, ts_of[s], eta_of[s], clip_of[s])
                    for s in ev.samplers}
            todo = [s for s in ev.samplers if keys[s] not in done]
            params = None
            if todo:
                state = _restore_planned(ckpt, setup.abstract_state(), step)
                if state is None:  # deleted by a run still training: skipped
                    rows.extend(done[keys[s]] for s in ev.samplers if keys[s] in done)
                    continue
                params = state.ema_params[saved.sample.ema_index]
            for s in ev.samplers:
                if s not in todo:
                    rows.append(done[keys[s]])
                    continue
                spec = {"step": step, "sampler": s, "ts": list(ts_of[s]), "n": ev.n_samples,
                        "batch": batch, "seed": int(saved.training.seed),
                        "ema_index": int(saved.sample.ema_index), "features": feats.tag}
                if eta_of[s] is not None:
                    spec["eta"] = eta_of[s]
                if clip_of[s] is not None:
                    spec["clip_denoised"] = clip_of[s]
                progress = Progress(os.path.join(run_dir, EVAL_DIR),
                                    f"step{step:08d}_{s}_{feats.metric}", spec, feats.dim,
                                    batch, ev.n_samples)
                row = _evaluate_one(progress, samplers[s], params, setup.sample_key, feats,
                                    ref, budget, specs[s].nfe)
                if row is None:
                    logging.info("stopped after max_rounds=%s; run again to continue",
                                 max_rounds)
                    return rows
                row["ema"] = float(saved.training.ema_rates[saved.sample.ema_index])
                append_row(run_dir, row)
                if tracker is not None:
                    tracker.eval_row(row)
                progress.remove()
                done[keys[s]] = row
                rows.append(row)
                logging.info("step %d %s: %s=%.4f IS=%s", step, s, feats.metric,
                             row[feats.metric], row["is"])
        return rows
    finally:
        ckpt.close()
        if tracker is not None:
            tracker.close()


def reconstruction_row(saved: config_lib.Config, run_dir: str, feats: features_lib.Features,
                       ref: fid.FeatureStats, n: int, batch: int) -> dict | None:
    """The latent run's autoencoder's reconstruction distance (real -> encode -> decode, the
    posterior mean) of `n` training images against the reference: the floor no latent model
    can go below. Computed once per store and sample count (kept in its manifest and in
    `eval.jsonl` as sampler `reconstruction`, step 0); None if already there."""
    from cm import latent
    from cm.data import latents as store_lib

    folder = latent.store_dir(saved, run_dir)
    manifest = store_lib.read_manifest(folder) or {}
    key = f"reconstruction_{feats.metric}_{feats.tag}_n{n}"
    done = {row_key(r) for r in read_results(run_dir)}
    row = {"step": 0, "sampler": "reconstruction", "ts": [], "nfe": 0, "n": n,
           "metric": feats.metric, feats.metric: manifest.get(key), "is": None,
           "is_std": None}
    if manifest.get(key) is not None and row_key(row) in done:
        return None
    if manifest.get(key) is None:
        ae = latent.autoencoder(saved)
        images, _ = data.load_dataset(saved.data)
        rows = np.sort(np.random.default_rng(0).permutation(len(images))[:n])
        stats = fid.RunningStats(feats.dim)
        for lo in range(0, n, batch):
            x = np.asarray(images[rows[lo:lo + batch]], np.float32) / 127.5 - 1.0
            rec = np.asarray(ae.decode(ae.encode(x)[0]))
            f, _ = feats.extract(np.clip(np.round((rec + 1.0) * 127.5), 0, 255).astype(
                np.uint8))
            stats.update(f)
        row[feats.metric] = fid.frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)
        if jax.process_index() == 0 and os.path.isdir(folder):
            store_lib.update_manifest(folder, **{key: row[feats.metric]})
    append_row(run_dir, row)
    logging.info("autoencoder reconstruction (%d images): %s=%.4f, the floor of this latent "
                 "run", n, feats.metric, row[feats.metric])
    return row


def _restore_planned(ckpt: checkpoints.Checkpointer, abstract_state, step: int):
    """The checkpoint of a planned `step`, or None with a warning if it is gone.

    A run still training in the same workdir deletes its oldest snapshots as it saves
    new ones (`training.keep_snapshots`), possibly after the evaluation planned them.
    """
    gone = ("the checkpoint of step %d is gone (deleted since the evaluation planned it, "
            "e.g. by the snapshot rotation of a run still training); skipping it")
    ckpt.reload()
    if step not in ckpt.all_steps():
        logging.warning(gone, step)
        return None
    try:
        return ckpt.restore(abstract_state, step)
    except Exception:
        ckpt.reload()
        if step in ckpt.all_steps():
            raise  # still there: a real failure
        logging.warning(gone, step)
        return None


def _evaluate_one(progress: Progress, sampler: Callable, params, base_key: jax.Array,
                  feats: features_lib.Features, ref: fid.FeatureStats, budget: list[float],
                  nfe: int | None) -> dict | None:
    """Finishes the rounds of one (step, sampler); its row, or None if out of budget.

    `nfe`: the sampler's network calls per image, or None for an adaptive sampler, whose
    row then records the mean over its rounds (each round's count is kept with it)."""
    spec = progress.spec
    stats, start = progress.load()
    if start:
        logging.info("step %d %s: resuming at round %d/%d", spec["step"], spec["sampler"],
                     start, progress.n_rounds)
    t0 = time.perf_counter()
    for r in range(start, progress.n_rounds):
        if budget[0] <= 0:
            return None
        key = round_key(base_key, spec["step"], spec["sampler"], r)
        count = min(progress.batch, progress.n - r * progress.batch)
        calls = None if nfe is not None else []
        f, logits = round_features(sampler, params, key, progress.batch, count, feats, calls)
        stats.update(f)
        progress.save(r, stats, logits, calls[0] if calls else None)
        budget[0] -= 1
        logging.info("step %d %s: round %d/%d, %d samples, %.1f samples/s", spec["step"],
                     spec["sampler"], r + 1, progress.n_rounds, stats.n,
                     (stats.n - start * progress.batch) / (time.perf_counter() - t0))
    value = fid.frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)
    is_mean = is_std = None
    logits = progress.logits()
    if logits is not None:
        is_mean, is_std = fid.inception_score(logits, min(IS_SPLITS, len(logits)))
    return {"step": spec["step"], "sampler": spec["sampler"], "ts": spec["ts"],
            "nfe": nfe if nfe is not None else progress.mean_nfe(), "n": spec["n"],
            "metric": feats.metric,
            feats.metric: value, "is": is_mean, "is_std": is_std,
            **({"eta": spec["eta"]} if "eta" in spec else {}),
            **({"clip_denoised": spec["clip_denoised"]} if "clip_denoised" in spec else {})}
