"""Exact linear assignment on the host: a registry of solvers behind one signature.

Every solver takes a square `[B, B]` cost matrix (rows are images, columns noises)
and returns `perm` with `perm[i]` the column given to row `i`, minimising
`sum_i C[i, perm[i]]`. `scipy` is the reference and always present; the
Jonker-Volgenant solvers of the `lapx` package (imported as `lap`) are used when it
is installed. `"auto"` picks the fastest exact one available (see `resolve_solver`).
"""

import functools
import importlib
from collections.abc import Callable, Mapping

import numpy as np
import scipy.optimize

from assignment import _cost

Solver = Callable[[np.ndarray], np.ndarray]


def _scipy(c: np.ndarray) -> np.ndarray:
    # Crouse's shortest augmenting path (no JV initialisation), float64 arithmetic.
    rows, cols = scipy.optimize.linear_sum_assignment(c)
    perm = np.empty(c.shape[0], np.int64)
    perm[rows] = cols
    return perm


@functools.cache
def _lap():  # The lapx package, or None.
    try:
        module = importlib.import_module("lap")
    except ImportError:
        return None
    return module if hasattr(module, "lapjvx") else None  # lapx, not the older `lap`


def _lapjv(c: np.ndarray) -> np.ndarray:
    # Jonker-Volgenant (column reduction, reduction transfer, augmenting row reduction,
    # then shortest augmenting paths), Kazmar's C++ from `lap`, float64 arithmetic.
    return np.asarray(_lap().lapjv(c.astype(np.float64), return_cost=False)[0], np.int64)


def _lapjvh(c: np.ndarray) -> np.ndarray:
    # lapx's hybrid Jonker-Volgenant: Rust initialisation and reduction, C++ shortest
    # augmenting paths. Square problems use float64 potentials even on float32 costs,
    # which it borrows without a copy; rows come back sorted.
    return np.asarray(_lap().lapjvh(c, return_cost=False)[1], np.int64)


def _lapjvh_batch(c: np.ndarray) -> np.ndarray:
    # Independent problems on all cores: the native solve releases the GIL.
    cols = _lap().lapjvh_batch(c, return_cost=False, n_threads=0)[1]
    return np.stack([np.asarray(col, np.int64) for col in cols])


def _lapjvs(c: np.ndarray) -> np.ndarray:
    # lapx's vectorised Jonker-Volgenant in float32 arithmetic: optimal on quantized
    # (fp16/bf16) costs in every test, where potentials stay on a coarse grid; on
    # float32 costs the total can miss the optimum by float32 rounding. Not in "auto".
    out = _lap().lapjvs(c.astype(np.float32), return_cost=False, jvx_like=False)
    return np.asarray(out[0], np.int64)


SOLVERS: Mapping[str, Solver] = {
    "scipy": _scipy,
    "lapjv": _lapjv,
    "lapjvh": _lapjvh,
    "lapjvs": _lapjvs,
}
_BATCH_SOLVERS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {"lapjvh": _lapjvh_batch}
_NEEDS_LAPX = frozenset({"lapjv", "lapjvh", "lapjvs"})
# Fastest exact (float64 arithmetic) first. At batch 1024 on 2 cores, lapjvh is ~8x
# faster than scipy on float32 costs (57 vs 450 ms; lapjv 104 ms) and on par with
# lapjv on fp16 costs (~50 vs 385 ms); bench/assignment.py prints the figures.
_AUTO_ORDER = ("lapjvh", "scipy")


@functools.cache
def available_solvers() -> tuple[str, ...]:
    """Names in `SOLVERS` whose package is installed."""
    return tuple(n for n in SOLVERS if n not in _NEEDS_LAPX or _lap() is not None)


def resolve_solver(solver: str) -> str:
    """Maps "auto" to the fastest available exact solver; checks any other name.

    Args:
        solver: "auto" or a key of `SOLVERS`.

    Returns:
        A key of `SOLVERS` whose package is installed.

    Raises:
        ValueError: unknown name, or its package is missing.
    """
    if solver == "auto":
        return next(n for n in _AUTO_ORDER if n in available_solvers())
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected 'auto' or one of {tuple(SOLVERS)}")
    if solver not in available_solvers():
        raise ValueError(f"solver {solver!r} needs the lapx package (pip install lapx)")
    return solver


def solve(c: np.ndarray, solver: str = "auto") -> np.ndarray:
    """Solves the square linear assignment problem with costs `c`.

    Args:
        c: `[B, B]` finite costs.
        solver: "auto" or a key of `SOLVERS`.

    Returns:
        `perm`, `[B]` int64, a permutation minimising `c[arange(B), perm].sum()`.

    Example:
        >>> import numpy as np
        >>> from assignment._linear import solve
        >>> solve(np.array([[4.0, 1.0], [2.0, 8.0]]), solver="scipy")
        array([1, 0])
    """
    name = resolve_solver(solver)
    c = np.asarray(c)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost matrix must be square, got shape {c.shape}")
    if c.shape[0] <= 1:
        return np.arange(c.shape[0], dtype=np.int64)
    perm = SOLVERS[name](c)
    if perm.shape != (c.shape[0],) or np.bincount(perm, minlength=len(perm)).max() != 1:
        raise RuntimeError(f"solver {name!r} returned no permutation: {perm}")
    return perm


def solve_many(c: np.ndarray, solver: str = "auto") -> np.ndarray:
    """Solves independent square problems `c[s]`, in parallel where the solver can.

    Args:
        c: `[S, n, n]` finite costs.
        solver: "auto" or a key of `SOLVERS`.

    Returns:
        `[S, n]` int64, one optimal permutation per problem.
    """
    name = resolve_solver(solver)
    if c.shape[0] > 1 and c.shape[1] > 1 and name in _BATCH_SOLVERS:
        perms = _BATCH_SOLVERS[name](c)
        if any(np.bincount(p, minlength=c.shape[1]).max() != 1 for p in perms):
            raise RuntimeError(f"solver {name!r} returned no permutation")
        return perms
    return np.stack([solve(block, name) for block in c]).reshape(c.shape[:2])


def check_shards(shards: int, batch: int) -> int:
    """Returns `shards` if it splits `batch` rows into equal parts, else raises ValueError."""
    if isinstance(shards, bool) or not isinstance(shards, int | np.integer) or shards < 1:
        raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
    if batch % shards:
        raise ValueError(f"batch of {batch} does not split into {shards} equal shards")
    return int(shards)


def linear_permutation(
    x: np.ndarray,
    z: np.ndarray,
    *,
    cost: str = "l2",
    dtype: str = "float32",
    scale: float = 1.0,
    solver: str = "auto",
    shards: int = 1,
) -> np.ndarray:
    """The exact minimum-total-cost pairing, `perm` with `z[perm]` the assigned noise.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`.
        cost: see `cost_matrix`.
        dtype: see `cost_matrix`.
        scale: see `cost_matrix`.
        solver: "auto" or a key of `SOLVERS`.
        shards: pair only within `shards` contiguous equal parts of the batch (one
            per device), each an independent problem.

    Returns:
        `[B]` int64 permutation.
    """
    solver = resolve_solver(solver)
    shards = check_shards(shards, x.shape[0])
    c = _cost.matrix(x, z, cost=cost, dtype=dtype, scale=scale, reduced=True, shards=shards)
    n = x.shape[0] // shards
    return (solve_many(c, solver) + n * np.arange(shards)[:, None]).reshape(-1)
