"""Frechet distance, streaming feature statistics and Inception Score.

FID compares Gaussians fitted to Inception pool features: `RunningStats` accumulates the
mean and covariance in float64 with memory independent of the number of images (mergeable
across rounds, hosts or devices; saved to resume), `frechet_distance` compares two fits,
and `save_stats` / `load_stats` cache them (pytorch-fid's `.npz` keys `mu`, `sigma`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import scipy.special


def _psd_factor(a: np.ndarray) -> np.ndarray:
    """F [D, r] with a = F F^T, r the numerical rank of the symmetric PSD matrix a.

    LAPACK's pivoted Cholesky (dpstrf) stops at the numerical rank (remaining diagonal
    below D * eps * max(diag)), so singular covariances (fewer images than dimensions)
    need no eps offset: the directions it drops carry only rounding noise.
    """
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(a, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf: illegal argument {-info}")
    factor = np.zeros((a.shape[0], rank), np.float64)
    factor[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: a[p][:, p] = L L^T
    return factor


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    `||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`. With
    `sigma1 = F F^T` (pivoted Cholesky, F [D, r]), the eigenvalues of `sigma1 sigma2` are
    those of the symmetric PSD `F^T sigma2 F` [r, r] (plus zeros), so the last trace is
    the sum of their square roots: one factorisation and one symmetric eigenvalue problem
    in float64, always real, a few seconds for D = 2048 where pytorch-fid's `sqrtm` takes
    a minute, and no eps offset even for singular covariances (fewer images than
    dimensions). Eigenvalues that rounding makes slightly negative count as 0.

    Args:
      mu1, mu2: means [D].
      sigma1, sigma2: covariances [D, D] (symmetric PSD).

    Returns:
      the squared Frechet distance (what is called FID), a float.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes differ: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    f = _psd_factor(s1)  # [D, r]
    m = f.T @ s2 @ f  # [r, r]
    eig = scipy.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class RunningStats:
    """Streaming mean and covariance of feature vectors, in float64.

    Holds the count, the mean [D] and the centred scatter matrix [D, D]; each batch is
    merged with Chan et al.'s pairwise update, which avoids the cancellation of the
    naive `sum(x x^T) - n mu mu^T` when the mean is large. Memory: 8 (D^2 + D) bytes
    (32 MiB for D = 2048), whatever the number of images.

    Example:
      >>> stats = RunningStats(2)
      >>> stats.update(np.array([[0.0, 1.0], [2.0, 3.0]]))
      >>> stats.update(np.array([[4.0, 5.0]]))
      >>> stats.n, stats.mean.tolist(), float(stats.cov[0, 0])
      (3, [2.0, 3.0], 4.0)
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self._mean = np.zeros(dim, np.float64)
        self._scatter = np.zeros((dim, dim), np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of features [B, D] (any float dtype)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {x.shape}")
        if x.shape[0] == 0:
            return
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        self._merge(x.shape[0], mean_b, xc.T @ xc)

    def merge(self, other: RunningStats) -> None:
        """Adds the statistics of another accumulator (another round, host or device)."""
        if other.dim != self.dim:
            raise ValueError(f"dimensions differ: {self.dim} vs {other.dim}")
        if other.n:
            self._merge(other.n, other._mean, other._scatter)

    def _merge(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        n = self.n + n_b
        delta = mean_b - self._mean
        self._scatter += scatter_b
        self._scatter += np.outer(delta, delta * (self.n * n_b / n))
        self._mean += delta * (n_b / n)
        self.n = n

    @property
    def mean(self) -> np.ndarray:
        """Mean [D] of the features so far."""
        if self.n == 0:
            raise ValueError("no features yet")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D] (ddof = 1, as `np.cov` and pytorch-fid)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.n}")
        s = self._scatter / (self.n - 1)
        return (s + s.T) / 2

    def save(self, path: str | os.PathLike) -> None:
        """Writes the accumulator (count, mean, scatter) to `path` (.npz), to resume later."""
        with open(path, "wb") as f:
            np.savez(f, n=np.int64(self.n), mean=self._mean, scatter=self._scatter)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunningStats:
        """An accumulator as written by `save`."""
        with np.load(path, allow_pickle=False) as z:
            stats = cls(int(z["mean"].shape[0]))
            stats.n = int(z["n"])
            stats._mean = z["mean"].astype(np.float64)
            stats._scatter = z["scatter"].astype(np.float64)
        return stats


class FeatureStats(NamedTuple):
    """A Gaussian fit of features: mean [D], covariance [D, D], count (None if unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None


def feature_stats(features: np.ndarray) -> FeatureStats:
    """One-shot statistics of features [N, D] (float64), as pytorch-fid computes them."""
    x = np.asarray(features, np.float64)
    return FeatureStats(x.mean(axis=0), np.cov(x, rowvar=False), x.shape[0])


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    """Writes reference statistics: `.npz` with `mu`, `sigma` (pytorch-fid's keys) and `n`."""
    with open(path, "wb") as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), n=n)


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Reads statistics written by `save_stats` or by pytorch-fid's `--save-stats`."""
    with np.load(path, allow_pickle=False) as z:
        n = int(z["n"]) if "n" in z.files else None
        return FeatureStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), n)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits, the mean and std over `splits` parts.

    As the original code (Salimans et al. 2016) and torch-fidelity: the images are cut
    into `splits` consecutive parts; in each, `exp(mean_i KL(p(y|x_i) || p(y)))` with
    p(y) the part's mean prediction. The softmax is over every logit given (all 1008
    for the FID Inception, with the unbiased logits of `features_and_logits`).

    Args:
      logits: [N, K] with N >= splits.
      splits: number of parts (10 is the standard).

    Returns:
      (mean, std) of the per-part scores.
    """
    logits = np.asarray(logits, np.float64)
    n = logits.shape[0]
    if logits.ndim != 2 or n < splits:
        raise ValueError(f"need logits [N, K] with N >= splits={splits}, got {logits.shape}")
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)  # [N, K]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])  # [K]
        kl = np.sum(np.exp(part) * (part - log_py), axis=1)  # [n_part]
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
