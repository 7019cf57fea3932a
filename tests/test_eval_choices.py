"""What evaluation samples with and what its features see.

`sample.ema_index` picks which EMA the rows are computed from (a run with two EMA rates,
index 1; compared with the checkpoint read back here); the Fashion-MNIST classifier's
input cuts the 2-pixel padding of 32x32 images off again (compared with the 28x28
images the test padded itself); `fd_pixels` features are pixels / 255.
"""

import jax
import numpy as np
import pytest

from cm import train
from cm.runtime import checkpoints, workdir
from cm.setup import Setup
from evaluation import fashion_net, features
from evaluation import run as eval_run
from tests.helpers import tiny_config


def test_evaluation_samples_with_the_configured_ema(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    config = tiny_config(**{
        "training.n_iters": 1, "training.snapshot_every": 1, "optim.warmup": 0,
        "training.ema_rates": (0.9, 0.5), "sample.ema_index": 1,
        "eval.n_samples": 16, "eval.batch_size": 16, "eval.samplers": ("1step",),
        "eval.cache_dir": str(tmp_path / "cache")})
    train.train(config, run_dir)
    seen = []
    real = eval_run._evaluate_one

    def spy(progress, sampler, params, *args, **kwargs):
        seen.append(jax.device_get(params))
        return real(progress, sampler, params, *args, **kwargs)

    monkeypatch.setattr(eval_run, "_evaluate_one", spy)
    rows = eval_run.evaluate(None, run_dir)
    assert len(rows) == 1 and len(seen) == 1
    assert rows[0]["ema"] == 0.5  # the row says which EMA it was computed from
    ckpt = checkpoints.Checkpointer(run_dir)
    state = jax.device_get(ckpt.restore(Setup(workdir.load_config(run_dir)).abstract_state(), 1))
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, seen[0], state.ema_params[1])
    # The two EMAs differ after a step (rates 0.9 and 0.5), so the check can tell them apart.
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(state.ema_params[0]), jax.tree.leaves(state.ema_params[1]),
        strict=True))


def test_fashion_input_cuts_the_padding_off_again():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    padded = np.pad(small, ((0, 0), (2, 2), (2, 2), (0, 0)))  # 28 -> 32, as cm.data.idx
    want = small.astype(np.float64) / 255.0
    np.testing.assert_allclose(np.asarray(fashion_net.to_input(padded)), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fashion_net.to_input(small)), want, atol=1e-6)


def test_pixel_features_are_pixels_over_255():
    images = np.array([0, 51, 255, 128], np.uint8).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(features.pixel_features(images),
                               [[0.0, 0.2, 1.0, 128 / 255]], rtol=1e-6)


@pytest.mark.parametrize("n", [3, 7])
def test_fashion_features_of_a_padded_last_batch_are_its_own(n):
    """Features of images in a short last batch equal those of the images alone."""
    params = fashion_net.FashionCNN((4, 4, 4), 8).init(
        jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    feats, logits = fashion_net.features_and_logits(params, images, batch_size=5)
    for i in range(n):
        f1, l1 = fashion_net.features_and_logits(params, images[i:i + 1], batch_size=1)
        np.testing.assert_allclose(feats[i], f1[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logits[i], l1[0], rtol=1e-5, atol=1e-6)


def test_cached_weights_of_another_version_are_refused(tmp_path):
    params = fashion_net.FashionCNN((4, 4, 4), 8).init(
        jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    path = str(tmp_path / "old.npz")
    fashion_net.save(path, params, {"name": "fashion_cnn-v0"})  # its sha256 file is right
    with pytest.raises(fashion_net.WeightsError, match="fashion_cnn-v0"):
        fashion_net.load(path)
    fashion_net.save(path, params, {"name": fashion_net.NAME})
    assert fashion_net.load(path)[1]["name"] == fashion_net.NAME
