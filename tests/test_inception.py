"""Parity of the Flax FID Inception with pytorch-fid's own network (random weights, CPU).

pytorch-fid's `fid_inception_v3()` is built without its download, with random weights and
randomised BatchNorm statistics (`evaluation.reference`); its state dict goes through
`params_from_torch`, and both networks see the same uint8 images. Forward passes at 299x299
are heavy on 2 cores, so every image set is computed once per module, in batches of 8 (one
compile of the Flax network).
"""

import warnings

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_fid.fid_score import calculate_frechet_distance

from evaluation import fid, inception, reference

BATCH = 8  # a multiple of the 8 simulated CPU devices: no padding waste


def _images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)  # [n, h, w, 3]


@pytest.fixture(scope="module")
def torch_model() -> torch.nn.Module:
    return reference.random_fid_inception(seed=0)


@pytest.fixture(scope="module")
def variables(torch_model):
    return inception.params_from_torch(reference.state_dict_numpy(torch_model))


@pytest.fixture(scope="module")
def image_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    big = _images(rng, BATCH, 40, 38).repeat(8, axis=1).repeat(8, axis=2)  # [8, 320, 304, 3]
    return {
        "a": _images(rng, BATCH, 32, 32),
        # A second set of the same kind: an FID of ~130, like real small-sample FIDs (a
        # shifted distribution gives ~1e4 with random weights, beyond float32 features).
        "b": _images(rng, BATCH, 32, 32),
        "big": big,  # downsampled to 299
    }


@pytest.fixture(scope="module")
def torch_outputs(torch_model, image_sets):
    return {k: reference.torch_features_and_logits(torch_model, v) for k, v in image_sets.items()}


@pytest.fixture(scope="module")
def flax_outputs(variables, image_sets):
    return {
        k: inception.features_and_logits(variables, v, batch_size=BATCH, bias=True)
        for k, v in image_sets.items()
    }


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    "size", [(32, 32), (28, 45), (64, 64), (320, 304), (600, 299), (299, 299), (1, 7)]
)
def test_resize_matches_torch_bilinear(size):
    images = _images(np.random.default_rng(0), 2, *size)
    ours = np.asarray(jax.jit(inception.preprocess)(images))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    ref = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    ref = (2 * ref - 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_both_key_conventions_give_the_same_variables(torch_model, variables):
    wrapper = reference.state_dict_numpy(reference.fid_wrapper(torch_model))
    assert "blocks.0.0.conv.weight" in wrapper and "fc.weight" not in wrapper
    from_wrapper = inception.params_from_torch(wrapper)
    assert "fc" not in from_wrapper["params"] and "fc" in variables["params"]
    with pytest.raises(KeyError, match="fc"):  # no logits without the fc layer
        inception.features_and_logits(from_wrapper, np.zeros((1, 32, 32, 3), np.uint8))
    trunk = {"params": {k: v for k, v in variables["params"].items() if k != "fc"}}
    trunk["batch_stats"] = variables["batch_stats"]
    jax.tree.map(np.testing.assert_array_equal, from_wrapper, trunk)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n_params == sum(p.numel() for p in torch_model.parameters())


def test_params_from_torch_rejects_bad_state_dicts(torch_model):
    sd = reference.state_dict_numpy(torch_model)
    missing = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c.branch_pool")}
    with pytest.raises(KeyError, match="missing"):
        inception.params_from_torch(missing)
    with pytest.raises(KeyError, match="unexpected"):
        inception.params_from_torch({**sd, "Mixed_5b.extra.conv.weight": np.zeros(1)})
    bad = dict(sd)
    bad["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="shape"):
        inception.params_from_torch(bad)
    with pytest.raises(KeyError, match="same tensor"):
        inception.params_from_torch(
            {**sd, "blocks.0.0.conv.weight": sd["Conv2d_1a_3x3.conv.weight"]}
        )
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    inception.params_from_torch(no_counters)  # the counters are optional


@pytest.mark.parametrize("name", ["a", "b", "big"])
def test_pool_features_match_pytorch_fid(name, torch_outputs, flax_outputs):
    ref, ours = torch_outputs[name][0], flax_outputs[name][0]
    assert ours.shape == ref.shape == (BATCH, 2048) and ours.dtype == np.float32
    assert _rel(ours, ref) <= 1e-4
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4


def test_logits_match_pytorch_fid(torch_outputs, flax_outputs, variables, image_sets):
    ref, ours = torch_outputs["a"][1], flax_outputs["a"][1]
    assert ours.shape == (BATCH, 1008)
    assert _rel(ours, ref) <= 1e-4
    # Default logits (for the Inception Score) are the unbiased ones; same features.
    feats, unbiased = inception.features_and_logits(variables, image_sets["a"], batch_size=BATCH)
    np.testing.assert_allclose(
        unbiased + np.asarray(variables["params"]["fc"]["bias"]), ours, atol=1e-4
    )
    np.testing.assert_array_equal(feats, flax_outputs["a"][0])


def test_pool_features_batches_pad_and_compile_once(variables, image_sets, flax_outputs):
    images = np.concatenate([image_sets["a"], image_sets["b"]])[:13]  # 2 batches, 1 padded
    feats = inception.pool_features(variables, images, batch_size=BATCH)
    ref = np.concatenate([flax_outputs["a"][0], flax_outputs["b"][0]])[:13]
    np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    _, forward = inception._compiled("highest")
    # The network compiled once per variables structure (with fc; the test of the other
    # structure is no recompile of this one), whatever the input sizes.
    assert forward._cache_size() == 1
    assert inception.pool_features(variables, images[:0]).shape == (0, 2048)
    with pytest.raises(ValueError, match="uint8"):
        inception.pool_features(variables, images.astype(np.float32))


def _span_reduced(feats_1: np.ndarray, feats_2: np.ndarray):
    """Statistics of both sets in an orthonormal basis of everything they span.

    Both covariances and the mean difference live in the span of the centred features
    and the mean difference, so the Frechet distance there equals the 2048-d one exactly;
    this lets pytorch-fid's `sqrtm` run on a [r, r] matrix (r < 20) instead of taking
    minutes on 2048x2048 with 2 cores.
    """
    f1, f2 = feats_1.astype(np.float64), feats_2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    q, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2, (mu1 - mu2)[None]]).T)
    p1, p2 = f1 @ q, f2 @ q
    return p1.mean(0), np.cov(p1, rowvar=False), p2.mean(0), np.cov(p2, rowvar=False)


def test_fid_matches_pytorch_fid(torch_outputs, flax_outputs):
    # Ours: Flax features -> streaming float64 statistics -> frechet_distance in 2048-d.
    stats = {}
    for name in ("a", "b"):
        stats[name] = fid.RunningStats(2048)
        for chunk in np.array_split(flax_outputs[name][0], 3):
            stats[name].update(chunk)
    ours = fid.frechet_distance(stats["a"].mean, stats["a"].cov, stats["b"].mean, stats["b"].cov)
    # pytorch-fid: torch features -> np.mean / np.cov -> calculate_frechet_distance.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's sqrtm deprecation of `disp`
        ref = calculate_frechet_distance(
            *_span_reduced(torch_outputs["a"][0], torch_outputs["b"][0])
        )
    assert ref > 1.0  # the sets differ: the comparison is not trivially 0 vs 0
    assert abs(ours - ref) <= 1e-3, (ours, ref)
    # The distance alone, on the same (torch) features: agrees to rounding.
    s1, s2 = fid.feature_stats(torch_outputs["a"][0]), fid.feature_stats(torch_outputs["b"][0])
    assert abs(fid.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma) - ref) <= 1e-8 * ref
