"""The image-noise distance of a pairing, on the host (NumPy) or inside a jitted step.

Plain L2 norms between the unscaled images and the noise they are trained with,
whatever cost, dtype and scale the assignment used: that is the geometry the network
sees, and the quantity the paper reports (1.93% to 2.44% shorter on CIFAR-10 for
batches 128 to 1024).
"""

import math
from typing import Any

import numpy as np


def pair_distances(x: Any, z: Any, xp: Any = np) -> Any:
    """Row-wise L2 distances `|x[i] - z[i]|`.

    Args:
        x: images, `[B, ...]`.
        z: noise, `[B, ...]`.
        xp: the array module: `numpy` (sums in float64) or `jax.numpy` (float32,
            jittable; the on-device path).

    Returns:
        `[B]` distances.

    Example:
        >>> import numpy as np
        >>> from assignment import pair_distances
        >>> pair_distances(np.zeros((2, 2)), np.array([[3.0, 4.0], [0.0, 1.0]]))
        array([5., 1.])
    """
    diff = (xp.asarray(x).astype(xp.float32) - xp.asarray(z).astype(xp.float32))
    diff = diff.reshape(x.shape[0], math.prod(x.shape[1:]))
    if xp is np:
        return np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    return xp.sqrt(xp.sum(diff * diff, axis=1))
