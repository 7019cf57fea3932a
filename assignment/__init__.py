"""Immiscible noise assignment: re-pairing each batch's Gaussian noise with its images.

What a user of the method needs, and nothing else:

- host (numpy): `assign(x, z, method, **options)` and `permutation(...)` with methods
  "none", "linear" (exact minimum total cost) and "knn";
- device (jittable): `device_assign(x, z, method, key=..., ...)`;
- the diagnostic: `pair_distances(x, z)`, the image-noise distance of each row;
- the names: `METHODS`, `PERMUTING` (the methods with a `permutation`),
  `DEVICE_METHODS`, `COSTS`, `DTYPES`, `SOLVERS`.

The building blocks (cost matrices, solvers, knn candidates) are in the private
modules. This package imports nothing from the rest of the project; the training
pipeline's stage that calls it is `cm.pairing`.
"""

from assignment._cost import COSTS, DTYPES
from assignment._device import DEVICE_METHODS, device_assign
from assignment._diagnostics import pair_distances
from assignment._linear import SOLVERS
from assignment._methods import METHODS, PERMUTATIONS, assign, permutation

PERMUTING = tuple(PERMUTATIONS)
del PERMUTATIONS

__all__ = [
    "COSTS",
    "DEVICE_METHODS",
    "DTYPES",
    "METHODS",
    "PERMUTING",
    "SOLVERS",
    "assign",
    "device_assign",
    "pair_distances",
    "permutation",
]
