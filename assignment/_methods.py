"""`assign` and `permutation`: the host entry points, with registries by method name.

A method is a function `(x, z, **options) -> z_assigned` in `METHODS`; a permuting
method also has `(x, z, **options) -> perm` in `PERMUTATIONS`. The keyword-only
parameters of a method's function are the options it accepts, so adding a method is
one function and one registry line.
"""

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from assignment import _cost, _knn, _linear


def _identity(
    x: np.ndarray,
    z: np.ndarray,
    *,
    cost: str = "l2",
    dtype: str = "float32",
    scale: float = 1.0,
    shards: int = 1,
) -> np.ndarray:
    del cost, dtype, scale  # Accepted so that configs can switch methods freely.
    _linear.check_shards(shards, x.shape[0])
    return np.arange(z.shape[0], dtype=np.int64)


def _none(
    x: np.ndarray, z: np.ndarray, *, cost: str = "l2", dtype: str = "float32", scale: float = 1.0
) -> np.ndarray:
    del x, cost, dtype, scale
    return z.copy()


def _linear_assign(
    x: np.ndarray,
    z: np.ndarray,
    *,
    cost: str = "l2",
    dtype: str = "float32",
    scale: float = 1.0,
    solver: str = "auto",
    shards: int = 1,
) -> np.ndarray:
    perm = _linear.linear_permutation(
        x, z, cost=cost, dtype=dtype, scale=scale, solver=solver, shards=shards
    )
    return z[perm]


METHODS: Mapping[str, Callable[..., np.ndarray]] = {
    "none": _none,
    "linear": _linear_assign,
    "knn": _knn.knn_assign,
}
PERMUTATIONS: Mapping[str, Callable[..., np.ndarray]] = {
    "none": _identity,
    "linear": _linear.linear_permutation,
}

# Value checks shared by every method that takes the option.
OPTION_CHECKS: Mapping[str, Callable[[Any], Any]] = {
    "cost": _cost.check_cost,
    "dtype": _cost.check_dtype,
    "scale": _cost.check_scale,
    "solver": _linear.resolve_solver,
    "k": _knn.check_k,
    "rng": lambda rng: rng,  # Checked by knn_assign, which knows whether it needs one.
    "shards": lambda shards: shards,  # Checked against the batch size by the method.
}


@functools.cache
def option_names(fn: Callable[..., Any]) -> frozenset[str]:
    """The keyword-only parameters of a registered method function."""
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def lookup(registry: Mapping[str, Callable[..., Any]], method: str) -> Callable[..., Any]:
    """`registry[method]`, or a ValueError naming the known methods."""
    if method not in registry:
        if method in METHODS:
            raise ValueError(
                f"method {method!r} does not permute the noise; "
                f"permuting methods are {tuple(registry)}"
            )
        raise ValueError(f"unknown assignment method {method!r}; expected one of {tuple(registry)}")
    return registry[method]


def check_options(fn: Callable[..., Any], method: str, options: Mapping[str, Any]) -> dict:
    """Checks option names against `fn`'s signature and their values.

    Returns:
        The options with normalised values ("auto" solver resolved, dtype as a name).
    """
    allowed = option_names(fn)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; it takes {sorted(allowed)}"
        )
    return {name: OPTION_CHECKS[name](value) for name, value in options.items()}


def assign(x: Any, z: Any, method: str, **options: Any) -> np.ndarray:
    """Re-pairs the noise `z` with the images `x`.

    Methods (`METHODS`):

    - "none": `z` unchanged (vanilla training).
    - "linear": the exact minimum-total-cost pairing, a permutation of the rows of `z`.
      Options `cost`, `dtype`, `scale` (see `cost_matrix`) and `solver` ("auto" or a
      key of `SOLVERS`); both permuting methods take `shards` (pair only within that
      many contiguous equal parts of the batch, one per device).
    - "knn": each image keeps the nearest of its k candidates, `z[i]` and k - 1 fresh
      standard normal draws from `rng` (see `knn_candidates`). Options `k` (default
      4), `rng` (a `numpy.random.Generator`, needed when k > 1), `cost`, `dtype`,
      `scale`. Its output is not a permutation of `z`, and the kept noise is not
      exactly Gaussian: it leans toward the data.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`, the same shape as `x`.
        method: a key of `METHODS`.
        **options: the method's options.

    Returns:
        The assigned noise, a new array with z's shape and dtype.

    Raises:
        ValueError: unknown method or option, bad option value, mismatched shapes,
            NaN or inf in `x` or `z`.

    Example:
        >>> import numpy as np
        >>> from assignment import assign
        >>> x = np.array([[1.0, 1.0], [-1.0, -1.0]])
        >>> z = np.array([[-0.9, -1.2], [1.1, 0.8]])
        >>> assign(x, z, "linear", solver="scipy")
        array([[ 1.1,  0.8],
               [-0.9, -1.2]])
    """
    fn = lookup(METHODS, method)
    options = check_options(fn, method, options)
    x, z = _cost.check_pair(x, z)
    return fn(x, z, **options)


def permutation(x: Any, z: Any, method: str, **options: Any) -> np.ndarray:
    """The permutation that a permuting method applies: `z[perm]` is the result.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`, the same shape as `x`.
        method: a key of `PERMUTATIONS` ("none" or "linear").
        **options: as for `assign`.

    Returns:
        `[B]` int64, a permutation of `arange(B)`.

    Raises:
        ValueError: as for `assign`, and for a method that does not permute ("knn").

    Example:
        >>> import numpy as np
        >>> from assignment import permutation
        >>> x = np.array([[1.0, 1.0], [-1.0, -1.0]])
        >>> z = np.array([[-0.9, -1.2], [1.1, 0.8]])
        >>> permutation(x, z, "linear", solver="scipy")
        array([1, 0])
    """
    fn = lookup(PERMUTATIONS, method)
    options = check_options(fn, method, options)
    x, z = _cost.check_pair(x, z)
    return fn(x, z, **options)
