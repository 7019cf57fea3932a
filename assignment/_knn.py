"""KNN noise selection (Improved Immiscible Diffusion): each image keeps the nearest
of its own k noise candidates. No coupling across the batch, so it is cheap at any
batch size, but the kept noise is neither a permutation of `z` nor exactly Gaussian.
"""

import math

import numpy as np

from assignment import _cost


def knn_candidates(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The k noise candidates of every image: `z` itself, then k - 1 fresh draws.

    Keeping `z` as candidate 0 makes k=1 the same as no assignment, and makes the
    fresh draws a deterministic function of `rng` alone.

    Args:
        z: noise, `[B, ...]`.
        k: candidates per image, at least 1.
        rng: source of the k - 1 fresh standard normal draws per image.

    Returns:
        `[B, k, ...]` candidates in z's dtype, `candidates[:, 0] == z`.

    Example:
        >>> import numpy as np
        >>> from assignment._knn import knn_candidates
        >>> z = np.zeros((2, 3), np.float32)
        >>> knn_candidates(z, 4, np.random.default_rng(0)).shape
        (2, 4, 3)
    """
    fresh = _draw(z, check_k(k), rng)
    return np.concatenate([z[:, None], fresh.astype(z.dtype)], axis=1)


def _draw(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((z.shape[0], k - 1, *z.shape[1:]), dtype=np.float32)


def check_k(k: int) -> int:
    """Returns `k` if it is an integer of at least 1, else raises ValueError."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def nearest(
    x: np.ndarray,
    candidates: np.ndarray,
    *,
    cost: str = "l2",
    dtype: str = "float32",
    scale: float = 1.0,
) -> np.ndarray:
    """Index of each image's nearest candidate (the first one on ties).

    Args:
        x: images, `[B, ...]`.
        candidates: `[B, K, ...]`, K candidates per image.
        cost: see `cost_matrix`.
        dtype: see `cost_matrix`.
        scale: see `cost_matrix`.

    Returns:
        `[B]` int64 indices into axis 1 of `candidates`.
    """
    b = x.shape[0]
    c = _cost.pair_costs(
        x.reshape(b, math.prod(x.shape[1:])),
        candidates.reshape(b, candidates.shape[1], math.prod(x.shape[1:])),
        cost=cost,
        dtype=dtype,
        scale=scale,
    )  # [B, K]
    return np.argmin(c, axis=1)


def knn_assign(
    x: np.ndarray,
    z: np.ndarray,
    *,
    k: int = 4,
    rng: np.random.Generator | None = None,
    cost: str = "l2",
    dtype: str = "float32",
    scale: float = 1.0,
) -> np.ndarray:
    """For each image, the nearest of its k candidates (`knn_candidates`).

    Not a permutation of `z`, and the kept noise leans toward the data, so it is not
    exactly Gaussian.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`, the first candidate of every image.
        k: candidates per image; k=1 returns `z`.
        rng: generator for the k - 1 fresh draws; required when k > 1.
        cost: see `cost_matrix`.
        dtype: see `cost_matrix`.
        scale: see `cost_matrix`.

    Returns:
        `[B, ...]` selected noise, z's shape and dtype.
    """
    k = check_k(k)
    options = {"cost": cost, "dtype": dtype, "scale": scale}
    if k == 1:
        return z.copy()
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"knn with k > 1 needs rng, a numpy Generator, got {rng!r}")
    # nearest(x, knn_candidates(z, k, rng)) without copying z into a candidate array.
    b, d = z.shape[0], math.prod(z.shape[1:])
    fresh = _draw(z, k, rng)  # [B, k - 1, ...]
    costs = [
        _cost.pair_costs(x.reshape(b, d), c.reshape(b, c.shape[1], d), **options)
        for c in (z[:, None], fresh)
    ]
    index = np.argmin(np.concatenate(costs, axis=1), axis=1)  # [B], first on ties
    out = z.copy()
    new = np.flatnonzero(index)
    out[new] = fresh[new, index[new] - 1]
    return out
