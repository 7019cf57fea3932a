"""The Fashion-MNIST classifier (evaluation/fashion_net.py) and `eval.features=fashion`.

Training on a tiny synthetic set (learns, is deterministic), the cached weights and their
sha256, the feature registry and reference statistics, an evaluation row; on the real
data (when installed): the cached classifier's test accuracy, and that the Fréchet
distance ranks images sensibly (train vs test small; more blur or noise, larger).
"""

import os

import numpy as np
import pytest
import scipy.ndimage

from cm import data, train
from cm.data import idx
from cm.runtime.views import DataConfig
from evaluation import fashion_net, features, fid
from evaluation import run as eval_run
from tests.helpers import tiny_config

TINY = fashion_net.TrainConfig(epochs=4, batch_size=32, lr=1e-2, widths=(4, 8, 8), hidden=16,
                               dropout=0.0)


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """10 classes of 28x28 images: class k is a bright 6x6 square at one of 10 places,
    on a noisy dark background. uint8 [n, 28, 28, 1], int labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = 3 + 12 * (k // 5), 1 + 5 * (k % 5)
        images[i, r:r + 6, c:c + 6] = 220
    return images, labels


@pytest.fixture(scope="module")
def tiny_params():
    images, labels = synthetic(640, 0)
    return fashion_net.train(images, labels, TINY, log=lambda s: None)


@pytest.fixture(scope="module")
def tiny_cache(tiny_params, tmp_path_factory):
    """A cache directory holding the tiny classifier under the real weights' name."""
    cache = tmp_path_factory.mktemp("cache")
    fashion_net.save(fashion_net.weights_path(str(cache)), tiny_params,
                     {"name": fashion_net.NAME, "test_accuracy": 0.0})
    return str(cache)


def test_trains_on_a_tiny_synthetic_set_deterministically(tiny_params):
    images, labels = synthetic(300, 1)  # held out
    assert fashion_net.accuracy(tiny_params, images, labels) >= 0.9
    again = fashion_net.train(*synthetic(640, 0), TINY, log=lambda s: None)
    for a, b in zip(_leaves(tiny_params), _leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)  # same bytes: same weights sha256
    other = fashion_net.train(*synthetic(640, 0), fashion_net.TrainConfig(
        **{**TINY.__dict__, "seed": 1}), log=lambda s: None)
    assert not np.array_equal(other["Dense_1"]["kernel"], tiny_params["Dense_1"]["kernel"])


def _leaves(params):
    import jax

    return jax.tree_util.tree_leaves(params)


def test_features_and_logits_shapes_and_padding(tiny_params):
    images, _ = synthetic(7, 2)
    f, lg = fashion_net.features_and_logits(tiny_params, images, batch_size=3)
    assert f.shape == (7, 16) and lg.shape == (7, 10) and (f >= 0).all()  # ReLU features
    f1, lg1 = fashion_net.features_and_logits(tiny_params, images[5:6], batch_size=3)
    np.testing.assert_allclose(f1[0], f[5], rtol=1e-5, atol=1e-6)  # padding rows ignored
    # 32x32 inputs are the padded 28x28 ones: the border is cut off again, exactly.
    f32, _ = fashion_net.features_and_logits(tiny_params, idx.pad(images, 32))
    np.testing.assert_allclose(f32, f, rtol=1e-5, atol=1e-6)
    f16, _ = fashion_net.features_and_logits(tiny_params, images[:, ::2, ::2])  # resized
    assert f16.shape == (7, 16)
    with pytest.raises(ValueError, match="uint8 images"):
        fashion_net.features_and_logits(tiny_params, images.astype(np.float32))


def test_cached_weights_sha256(tiny_params, tmp_path, monkeypatch):
    path = fashion_net.weights_path(str(tmp_path))
    digest = fashion_net.save(path, tiny_params, {"name": fashion_net.NAME, "test_accuracy": 1})
    with open(path + ".sha256") as f:
        assert f.read().split()[0] == digest == fashion_net._sha256(path)
    params, manifest = fashion_net.load(path)
    assert manifest["sha256"] == digest and manifest["test_accuracy"] == 1
    for a, b in zip(_leaves(params), _leaves(tiny_params), strict=True):
        np.testing.assert_array_equal(a, b)

    assert fashion_net.load_weights(path)[1]["sha256"] == digest  # eval.fashion_weights
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(fashion_net.WeightsError, match="corrupt"):
        fashion_net.load(path)
    os.remove(path + ".sha256")
    with pytest.raises(fashion_net.WeightsError, match="sha256 is missing"):
        fashion_net.load(path)
    with pytest.raises(fashion_net.WeightsError, match="does not exist"):  # never trains
        fashion_net.load_weights(str(tmp_path / "empty" / "fashion_cnn-v1.npz"))


def test_feature_registry_and_reference_statistics(tiny_cache, tiny_params, monkeypatch):
    fm = DataConfig(name="fashion_mnist", image_size=16, num_channels=1)
    assert features.resolve_kind("auto", fm) == "fashion"
    f = features.make_features("fashion", fm, features.Options(
        cache_dir=tiny_cache, fashion_weights=fashion_net.weights_path(tiny_cache)))
    sha = fashion_net.load(fashion_net.weights_path(tiny_cache))[1]["sha256"]
    assert (f.kind, f.metric, f.dim, f.tag) == ("fashion", "fd_fashion", 16,
                                                f"fashion-{sha[:8]}")
    assert features.reference_path(fm, f.tag, cache_dir=tiny_cache).endswith(
        f"fid_stats/fashion_mnist_train_16px_fashion-{sha[:8]}.npz")
    with pytest.raises(ValueError, match="grayscale"):
        features.make_features("fashion", DataConfig(image_size=16, num_channels=3),
                               features.Options(cache_dir=tiny_cache,
                                                fashion_weights=fashion_net.weights_path(
                                                    tiny_cache)))
    # Reference statistics of a small dataset = the direct statistics of its features.
    images, _ = synthetic(50, 3)
    small = images[:, ::2, ::2]  # [50, 14, 14, 1]
    monkeypatch.setattr(data, "load_images", lambda cfg: small)
    path = os.path.join(tiny_cache, "ref.npz")
    ref = features.ensure_reference(fm, f, path, chunk=20)
    direct, _ = fashion_net.features_and_logits(tiny_params, small)
    np.testing.assert_allclose(ref.mu, direct.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref.sigma, np.cov(direct.astype(np.float64), rowvar=False),
                               rtol=1e-6, atol=1e-7)


def test_evaluation_row_has_fd_fashion_and_classifier_score(tiny_cache, tmp_path):
    config = tiny_config(**{"training.n_iters": 1, "training.snapshot_every": 1,
                            "eval.n_samples": 24, "eval.batch_size": 16,
                            "eval.samplers": ("1step",), "eval.features": "fashion",
                            "eval.cache_dir": tiny_cache,
                            "eval.fashion_weights": fashion_net.weights_path(tiny_cache)})
    run_dir = str(tmp_path / "run")
    train.train(config, run_dir)
    (row,) = eval_run.evaluate(None, run_dir)
    assert row["metric"] == "fd_fashion" and np.isfinite(row["fd_fashion"])
    assert row["fd_fashion"] > 0 and 1.0 <= row["is"] <= 10.0  # 10 classes: score in [1, 10]


# ----------------------------------------------------------------------------------------
# The real data.

_INSTALLED = os.path.isfile(os.path.join(idx.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_data = pytest.mark.skipif(
    not _INSTALLED, reason=f"Fashion-MNIST not installed: {idx.FASHION_MNIST_INSTALL}")


def test_the_shipped_classifier_is_the_docs_one_and_loads_by_default(tmp_path):
    """The weights every fd_fashion in docs/ used: the file's sha256 (computed here) is the
    recorded one, the default load returns them, and a changed byte is refused."""
    import hashlib

    with open(fashion_net.SHIPPED, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == fashion_net.SHIPPED_SHA256 == (
            "1c34e8657b9b81c2b16272278854f0d2ed99040f47c3f2463afc92f896cf43c1")
    _, manifest = fashion_net.load_weights()
    assert manifest["sha256"] == fashion_net.SHIPPED_SHA256
    assert manifest["test_accuracy"] == pytest.approx(0.9202)
    copy = tmp_path / "fashion_cnn-v1.npz"
    raw = bytearray(open(fashion_net.SHIPPED, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(fashion_net.WeightsError, match="corrupt"):
        fashion_net.load(str(copy), fashion_net.SHIPPED_SHA256)


@needs_data
def test_shipped_classifier_reaches_its_accuracy_on_the_test_split():
    params, manifest = fashion_net.load_weights()
    images, labels = idx.load_split(idx.FASHION_MNIST_DIR, "test")
    acc = fashion_net.accuracy(params, images, labels)
    assert acc == pytest.approx(0.9202, abs=5e-4)  # 9,202 of 10,000 (a few may flip elsewhere)
    assert abs(acc - manifest["test_accuracy"]) < 1e-3  # what `python -m` reported


def _corrupt(images: np.ndarray, kind: str, level: float, seed: int = 0) -> np.ndarray:
    x = images[..., 0].astype(np.float64)
    if kind == "blur":
        x = scipy.ndimage.gaussian_filter(x, sigma=(0, level, level))
    else:
        x = x + np.random.default_rng(seed).normal(0.0, level, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)[..., None]


@pytest.fixture(scope="module")
def real_setup():
    return load_real_setup()


def load_real_setup():
    """(params, train A, train B, test): the shipped classifier; 2,000-image subsets."""
    train_images, _ = idx.load_split(idx.FASHION_MNIST_DIR, "train")
    test_images, _ = idx.load_split(idx.FASHION_MNIST_DIR, "test")
    params, _ = fashion_net.load_weights()
    rng = np.random.default_rng(0)
    sub = rng.permutation(40_000)  # subsets disjoint from the small network's images
    return params, train_images[sub[:2000]], train_images[sub[2000:4000]], test_images[:2000]


@needs_data
def test_frechet_distance_ranks_real_images_sensibly(real_setup):
    params, train_a, train_b, test = real_setup

    def stats(images):
        f, _ = fashion_net.features_and_logits(params, images)
        return fid.feature_stats(f)

    ref = stats(train_a)

    def fd(images):
        s = stats(images)
        return fid.frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)

    floor = fd(train_b)  # two training subsets: the sampling noise of 2,000 images
    split = fd(test)
    blur = [fd(_corrupt(test, "blur", s)) for s in (0.5, 1.0, 1.5, 2.5)]
    noise = [fd(_corrupt(test, "noise", s)) for s in (16, 32, 48, 64)]  # std, 0..255 units
    # Train vs test: within twice the floor of two training subsets (same distribution,
    # other images; the 2,000-image sampling noise alone).
    assert split < 2 * floor, (split, floor)
    # Clean test images, then each corruption level, are further and further away.
    for curve in ([split, *blur], [split, *noise]):
        assert all(a < b for a, b in zip(curve, curve[1:], strict=False)), (split, blur, noise)
