"""Frechet distance, streaming statistics and Inception Score against closed forms."""

import math
import warnings

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from evaluation import fid


def _random_cov(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d  # [d, d]


def _low_rank_exact(x1: np.ndarray, x2: np.ndarray) -> float:
    """Exact FID of two small samples (n < d): tr sqrt(S1 S2) is a nuclear norm in n-space."""
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = len(x1) - 1, len(x2) - 1
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / math.sqrt(n1 * n2)
    diff = x1.mean(0) - x2.mean(0)
    return diff @ diff + (c1**2).sum() / n1 + (c2**2).sum() / n2 - 2 * tr_covmean


def test_identical_gaussians_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=64), _random_cov(rng, 64)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    singular = _random_cov(rng, 64, rank=5)
    assert abs(fid.frechet_distance(mu, singular, mu, singular)) < 1e-9


def test_diagonal_covariances_textbook_value():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


@pytest.mark.parametrize("rank", [64, 20, 3])
def test_matches_pytorch_fid(rank):
    rng = np.random.default_rng(rank)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    s1, s2 = _random_cov(rng, 64, rank), _random_cov(rng, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("n", [2, 8, 40])
def test_nearly_singular_covariances(n):
    # Fewer samples than dimensions (as an FID on a few images): exact low-rank answer.
    rng = np.random.default_rng(n)
    x1 = np.maximum(rng.normal(0.5, 0.5, (n, 2048)), 0)
    x2 = np.maximum(rng.normal(0.4, 0.6, (n + 3, 2048)), 0)
    s1, s2 = fid.feature_stats(x1), fid.feature_stats(x2)
    got = fid.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert np.isfinite(got) and isinstance(got, float)
    assert got == pytest.approx(_low_rank_exact(x1, x2), rel=1e-9)
    # Nearly singular, full rank: an eigenvalue 1e-12 of the largest.
    w = np.linspace(1e-12, 1.0, 64)
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    s = (q * w) @ q.T
    assert abs(fid.frechet_distance(np.zeros(64), s, np.zeros(64), s)) < 1e-9


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_stats_equal_one_shot():
    rng = np.random.default_rng(2)
    # A large mean next to a small spread: the naive sum of squares would lose digits.
    x = (1e3 + rng.normal(size=(1001, 32))).astype(np.float32)
    one_shot = fid.feature_stats(x)
    stats = fid.RunningStats(32)
    for chunk in np.array_split(x, [1, 7, 7, 500, 999]):  # sizes 1, 6, 0, 493, 499, 2
        stats.update(chunk)
    assert stats.n == 1001
    np.testing.assert_allclose(stats.mean, one_shot.mu, rtol=1e-13)
    np.testing.assert_allclose(stats.cov, one_shot.sigma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9)
    # Merging two accumulators equals one accumulator over both.
    left, right = fid.RunningStats(32), fid.RunningStats(32)
    left.update(x[:300])
    right.update(x[300:])
    left.merge(right)
    np.testing.assert_allclose(left.cov, one_shot.sigma, rtol=1e-9, atol=1e-12)


def test_running_stats_save_load_resumes(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    stats = fid.RunningStats(8)
    stats.update(x[:20])
    stats.save(tmp_path / "partial.npz")
    resumed = fid.RunningStats.load(tmp_path / "partial.npz")
    resumed.update(x[20:])
    np.testing.assert_allclose(resumed.cov, np.cov(x, rowvar=False), rtol=1e-12)
    assert resumed.n == 50


def test_running_stats_errors():
    stats = fid.RunningStats(4)
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mean
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.cov
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        stats.update(np.zeros((3, 5)))


def test_stats_file_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=8), _random_cov(rng, 8)
    fid.save_stats(tmp_path / "ref.npz", mu, sigma, n=123)
    loaded = fid.load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert loaded.n == 123
    # pytorch-fid's own stats files have only mu and sigma.
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert fid.load_stats(tmp_path / "pytorch_fid.npz").n is None


def test_inception_score_uniform_is_one():
    mean, std = fid.inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # Identical non-uniform predictions: p(y|x) = p(y), KL = 0.
    logits = np.tile(np.random.default_rng(5).normal(size=(1, 10)), (50, 1))
    assert fid.inception_score(logits, splits=5)[0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("c", [0.0, 2.0, 8.0, 40.0])
def test_inception_score_peaked_closed_form(c):
    # Each split holds every one of k classes equally often; logit c on the true class.
    k, splits = 10, 4
    labels = np.tile(np.arange(k), 3 * splits)  # 120 images, 30 per split
    logits = c * np.eye(k)[labels]
    log_b = -(c + math.log1p((k - 1) * math.exp(-c)))  # p(other class | x) = 1/(e^c + k - 1)
    log_a = c + log_b  # p(true class | x)
    b, a = math.exp(log_b), math.exp(log_a)
    kl = a * (log_a + math.log(k)) + (k - 1) * b * (log_b + math.log(k))  # p(y) is uniform
    mean, std = fid.inception_score(logits, splits=splits)
    assert mean == pytest.approx(math.exp(kl), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    if c == 40.0:
        assert mean == pytest.approx(k, rel=1e-9)  # one-hot predictions: IS = #classes


def test_inception_score_splits_and_errors():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(103, 7)) * 3
    mean, std = fid.inception_score(logits, splits=10)
    # Consecutive parts i*n//10 .. (i+1)*n//10 (the original code's split).
    bounds = [(i * 103 // 10, (i + 1) * 103 // 10) for i in range(10)]
    parts = [fid.inception_score(logits[lo:hi], splits=1)[0] for lo, hi in bounds]
    assert mean == pytest.approx(np.mean(parts)) and std == pytest.approx(np.std(parts))
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(logits[:5], splits=10)


def test_inception_score_heterogeneous_predictions_against_numpy():
    """Predictions of unequal confidence, so the per-image KLs differ within a split: the
    score is exp of the mean KL, not the mean of exp(KL) (the closed-form tests above have
    equal KLs in every split, where the two agree). Reference: softmax and KL written out
    per image in float64."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(60, 8)) * rng.uniform(0.2, 6.0, size=(60, 1))
    splits = 3
    scores = []
    for s in range(splits):
        part = logits[s * 20:(s + 1) * 20]
        p = np.exp(part - part.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        py = p.mean(axis=0)
        kls = [sum(pi[j] * math.log(pi[j] / py[j]) for j in range(8)) for pi in p]
        assert np.std(kls) > 0.1  # the per-image KLs really differ
        scores.append(math.exp(np.mean(kls)))
    mean, std = fid.inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
