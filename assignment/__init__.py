"""Immiscible noise assignment: re-pairing each batch's Gaussian noise with its images.

Host (numpy): `assign` / `permutation` with methods "none", "linear" (exact minimum
total cost) and "knn"; `make_batch_fn` and `Pipeline` run them in a background
thread ahead of the training step. Device (jittable): `device_assign`. This package
imports nothing from the rest of the project.
"""

from assignment._batch import SCOPES, BatchFn, knn_rng, make_batch_fn
from assignment._cost import COSTS, DTYPES, cost_matrix
from assignment._device import (
    DEVICE_METHODS,
    device_assign,
    device_cost_matrix,
    device_knn_candidates,
    device_nearest,
    device_permutation,
)
from assignment._diagnostics import (
    DIAGNOSTIC_KEYS,
    distance_stats,
    pair_distances,
    split_diagnostics,
)
from assignment._knn import knn_candidates, nearest
from assignment._linear import SOLVERS, available_solvers, resolve_solver, solve
from assignment._methods import METHODS, PERMUTATIONS, assign, permutation
from assignment._pipeline import Pipeline, PipelineError, PipelineStats

__all__ = [
    "COSTS",
    "DEVICE_METHODS",
    "DIAGNOSTIC_KEYS",
    "DTYPES",
    "METHODS",
    "PERMUTATIONS",
    "SCOPES",
    "SOLVERS",
    "BatchFn",
    "Pipeline",
    "PipelineError",
    "PipelineStats",
    "assign",
    "available_solvers",
    "cost_matrix",
    "device_assign",
    "device_cost_matrix",
    "device_knn_candidates",
    "device_nearest",
    "device_permutation",
    "distance_stats",
    "knn_candidates",
    "knn_rng",
    "make_batch_fn",
    "nearest",
    "pair_distances",
    "permutation",
    "resolve_solver",
    "solve",
    "split_diagnostics",
]
