"""Immiscible noise assignment: re-pairing each batch's Gaussian noise with its images.

What a user of the method needs, and nothing else:

- host (numpy): `assign(x, z, method, **options)` and `permutation(...)` with methods
  "none", "linear" (exact minimum total cost) and "knn";
- the pipeline stage: `Options` (the `assignment` config section, checked),
  `make_batch_fn(options)` and `Pipeline`, which pair batches in a background thread
  ahead of the training step; `split_diagnostics` separates the distances they report;
- device (jittable): `device_assign(x, z, method, key=..., ...)`;
- the names: `METHODS`, `DEVICE_METHODS`, `SCOPES`, `COSTS`, `DTYPES`, `SOLVERS`.

The building blocks (cost matrices, solvers, knn candidates) are in the private
modules. This package imports nothing from the rest of the project.
"""

from assignment._batch import SCOPES, Options, make_batch_fn
from assignment._cost import COSTS, DTYPES
from assignment._device import DEVICE_METHODS, device_assign
from assignment._diagnostics import split_diagnostics
from assignment._linear import SOLVERS
from assignment._methods import METHODS, assign, permutation
from assignment._pipeline import Pipeline, PipelineError, PipelineStats

__all__ = [
    "COSTS",
    "DEVICE_METHODS",
    "DTYPES",
    "METHODS",
    "SCOPES",
    "SOLVERS",
    "Options",
    "Pipeline",
    "PipelineError",
    "PipelineStats",
    "assign",
    "device_assign",
    "make_batch_fn",
    "permutation",
    "split_diagnostics",
]
