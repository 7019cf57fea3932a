"""`--mode eval` / `--mode fid_stats` on the digits with pixel features: no Inception weights.

Reference statistics against a direct computation, checkpoint selection, and an
evaluation that is interrupted (by a round budget, then by a crash inside a round) and
resumed, which must write exactly the rows of an uninterrupted one.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from cm import data, train
from cm.runtime import checkpoints, workdir
from cm.runtime.views import DataConfig
from cm.setup import Setup
from evaluation import features, fid
from evaluation import run as eval_run
from tests.helpers import tiny_config

N_SAMPLES, BATCH = 40, 16  # 3 rounds per (step, sampler), the last one cut to 8 samples


def eval_config(cache_dir, **overrides):
    overrides = {"eval.n_samples": N_SAMPLES, "eval.batch_size": BATCH,
                 "eval.cache_dir": str(cache_dir), **overrides}
    # warmup 0: step 1 moves the parameters, so the two checkpoints differ.
    return tiny_config(**{"training.n_iters": 2, "training.snapshot_every": 1,
                          "optim.warmup": 0, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with snapshots at steps 1 and 2 (its saved config holds the eval fields)."""
    root = tmp_path_factory.mktemp("eval")
    run_dir = str(root / "run")
    train.train(eval_config(root / "cache"), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full") / "run")
    shutil.copytree(trained, run_dir)
    evaluated = []  # the parameters each row is computed from, in the rows' order
    real = eval_run._evaluate_one

    def spy(progress, sampler, params, *args, **kwargs):
        evaluated.append(jax.device_get(params))
        return real(progress, sampler, params, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eval_run, "_evaluate_one", spy)
        rows = eval_run.evaluate(None, run_dir)
    return run_dir, rows, evaluated


def results_text(run_dir):
    with open(os.path.join(run_dir, eval_run.RESULTS)) as f:
        return f.read()


@pytest.mark.parametrize(
    "spec, expected",
    [("", [3, 6, 9]), ("latest", [10]), ("6", [6]), ("10", [10]), ("4-9", [6, 9]),
     ("0-3", [3]), ("9, 3", [3, 9]), ("3-6,latest,6", [3, 6, 10]), (" ", [3, 6, 9])],
)
def test_select_steps(spec, expected):
    # snapshots 3, 6, 9; the resume checkpoint is at 10
    assert eval_run.select_steps(spec, [3, 6, 9], [3, 6, 9, 10]) == expected


@pytest.mark.parametrize("spec", ["abc", "5", "7-5", "1-2-3", "-5", "4-5", "3,,6", "1000-"])
def test_select_steps_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="eval.steps"):
        eval_run.select_steps(spec, [3, 6, 9], [3, 6, 9, 10])


def test_select_steps_without_snapshots():
    with pytest.raises(ValueError, match="no snapshots"):
        eval_run.select_steps("", [], [4])
    assert eval_run.select_steps("latest", [], [4]) == [4]


def test_feature_kinds_and_auto():
    digits = DataConfig(name="digits", image_size=8, num_channels=1)
    cifar = DataConfig(name="cifar10")
    gray = DataConfig(name="npz", num_channels=1)
    assert features.resolve_kind("auto", digits) == "pixels"
    assert features.resolve_kind("auto", gray) == "pixels"
    assert features.resolve_kind("auto", cifar) == "inception"
    assert features.resolve_kind("pixels", cifar) == "pixels"
    with pytest.raises(ValueError, match="unknown eval.features"):
        features.resolve_kind("clip", cifar)
    f = features.make_features("auto", digits, features.Options())
    assert (f.kind, f.metric, f.dim) == ("pixels", "fd_pixels", 64)
    images = np.arange(2 * 64, dtype=np.uint8).reshape(2, 8, 8, 1)
    feats, logits = f.extract(images)
    assert logits is None and feats.shape == (2, 64) and feats[1, -1] == 127 / 255


def test_reference_stats_of_digits_are_the_direct_pixel_statistics(tmp_path, monkeypatch):
    config = eval_config(tmp_path)
    path = eval_run.reference_stats(config, str(tmp_path / "run"))
    assert path == str(tmp_path / "fid_stats" / "digits_train_8px_pixels.npz")
    ref = fid.load_stats(path)
    pixels = (data.load_digits(8).reshape(-1, 64).astype(np.float32) / 255.0).astype(np.float64)
    assert ref.n == len(pixels) == 1797
    np.testing.assert_allclose(ref.mu, pixels.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(pixels, rowvar=False), rtol=0, atol=1e-12)

    def no_loading(cfg):
        raise AssertionError("the cached statistics should have been reused")

    monkeypatch.setattr(data, "load_images", no_loading)
    assert eval_run.reference_stats(config) == path
    config.eval.stats_path = str(tmp_path / "elsewhere.npz")
    with pytest.raises(AssertionError, match="reused"):
        eval_run.reference_stats(config)


def test_evaluation_rows(uninterrupted):
    run_dir, rows, evaluated = uninterrupted
    assert [(r["step"], r["sampler"]) for r in rows] == [
        (1, "1step"), (1, "2step"), (2, "1step"), (2, "2step")]
    assert eval_run.read_results(run_dir) == rows
    for r in rows:
        assert r["n"] == N_SAMPLES and r["metric"] == "fd_pixels" and "fid" not in r
        assert r["is"] is None and r["is_std"] is None
        assert np.isfinite(r["fd_pixels"]) and r["fd_pixels"] > 0
    assert rows[0]["ts"] == [80.0] and rows[1]["ts"] == [80.0, 0.821]
    assert rows[0]["fd_pixels"] != rows[1]["fd_pixels"]
    assert eval_run.progress_dirs(run_dir) == []  # finished rounds are cleaned up
    # Each row samples with the EMA parameters of its own step's checkpoint.
    ckpt = checkpoints.Checkpointer(run_dir)
    abstract = Setup(workdir.load_config(run_dir)).abstract_state()
    states = {s: jax.device_get(ckpt.restore(abstract, s)) for s in (1, 2)}
    ckpt.close()
    for row, params in zip(rows, evaluated, strict=True):
        jax.tree.map(np.testing.assert_array_equal, params, states[row["step"]].ema_params[0])

    def differ(a, b):
        return any(not np.array_equal(x, y)
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    # ... which the check can tell apart: step 1 moved the parameters (EMA != online).
    assert differ(states[1].ema_params[0], states[2].ema_params[0])
    assert differ(states[1].ema_params[0], states[1].params)


def test_interrupted_and_resumed_evaluation_writes_the_same_rows(
        uninterrupted, trained, tmp_path, monkeypatch):
    full_dir, full_rows, _ = uninterrupted
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)

    # 1. A round budget: the first (step, sampler) and one round of the second.
    rows = eval_run.evaluate(None, run_dir, max_rounds=4)
    assert rows == full_rows[:1] and eval_run.read_results(run_dir) == full_rows[:1]
    assert len(eval_run.progress_dirs(run_dir)) == 1

    # 2. A crash inside the next round, after two more rounds (finishing that pair).
    real = eval_run.round_features
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("preempted")
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_run, "round_features", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        eval_run.evaluate(None, run_dir)
    monkeypatch.setattr(eval_run, "round_features", real)
    assert eval_run.read_results(run_dir) == full_rows[:2]

    # 3. Resume to the end.
    assert eval_run.evaluate(None, run_dir) == full_rows
    assert results_text(run_dir) == results_text(full_dir)


def test_rerun_skips_done_rows_and_given_config_overrides_eval(uninterrupted, tmp_path,
                                                               monkeypatch):
    full_dir, full_rows, _ = uninterrupted
    run_dir = str(tmp_path / "run")
    shutil.copytree(full_dir, run_dir)
    before = results_text(run_dir)

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(eval_run, "round_features", no_sampling)
    assert eval_run.evaluate(None, run_dir) == full_rows
    assert results_text(run_dir) == before

    # A given config contributes its eval section only: here a done subset...
    config = eval_config(tmp_path, **{"eval.steps": "latest", "eval.samplers": ("2step",),
                                      "model.nf": 999})
    assert eval_run.evaluate(config, run_dir) == [full_rows[3]]
    # ... and here a new sample count, which is a new row.
    monkeypatch.undo()
    config.eval.n_samples = 8
    (row,) = eval_run.evaluate(config, run_dir)
    assert (row["step"], row["sampler"], row["n"]) == (2, "2step", 8)
    assert eval_run.read_results(run_dir) == full_rows + [row]
    assert workdir.load_config(run_dir).model.nf == 8  # the saved config is untouched


def test_evaluate_rejects_bad_settings(trained, tmp_path):
    config = eval_config(tmp_path, **{"eval.samplers": ("3step",)})
    with pytest.raises(ValueError, match="eval.samplers"):
        eval_run.evaluate(config, trained)
    config = eval_config(tmp_path, **{"eval.steps": "7"})
    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        eval_run.evaluate(config, trained)
    with pytest.raises(FileNotFoundError, match="config.json"):
        eval_run.evaluate(None, str(tmp_path / "nothing"))


def test_a_cut_round_keeps_only_its_first_count_samples():
    """The last round of an evaluation draws a full batch but counts `count` samples (40
    samples in batches of 16: 16 + 16 + 8); the Frechet distance must see exactly
    eval.n_samples images, so the round returns the features of the first `count` only."""
    images = np.arange(16 * 2 * 2, dtype=np.uint8).reshape(16, 2, 2, 1)

    def sampler(params, key, batch):
        assert batch == 16
        return images

    pixels = features.Features("pixels", "fd_pixels", 4,
                               lambda im: (im.reshape(len(im), -1) / 255.0, None))
    feats, logits = eval_run.round_features(sampler, None, jax.random.PRNGKey(0), 16, 8, pixels)
    assert logits is None and feats.shape == (8, 4)
    np.testing.assert_array_equal(feats, images[:8].reshape(8, 4) / 255.0)
    with_logits = features.Features("pixels", "fd_pixels", 4,
                                    lambda im: (im.reshape(len(im), -1) / 255.0,
                                                im.reshape(len(im), -1)[:, :3] * 1.0))
    feats, logits = eval_run.round_features(sampler, None, jax.random.PRNGKey(0), 16, 5,
                                            with_logits)
    assert feats.shape == (5, 4) and logits.shape == (5, 3)
    np.testing.assert_array_equal(logits, images[:5].reshape(5, 4)[:, :3])
