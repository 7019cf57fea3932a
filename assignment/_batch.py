"""The host pipeline's per-batch function: assign each batch's noise, add diagnostics.

`make_batch_fn(Options(...))` turns the `assignment` section of a config into a function
`fn(batch, step) -> batch` for `Pipeline`. A batch is a dict holding images and
noise (keys "x" and "z" by default) and anything else (labels, ...), which passes
through untouched: only the noise is re-paired, so every other key stays paired
with its image.
"""

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from assignment import _cost, _diagnostics, _methods

BatchFn = Callable[[Mapping[str, Any], int], dict[str, Any]]
SCOPES = ("device", "host")
_KNN_STREAM = 0x6B6E6E  # "knn": keeps knn's draws apart from any other (seed, step) stream.


def knn_rng(seed: int, step: int, process_index: int = 0) -> np.random.Generator:
    """The generator of knn's fresh draws at `step`: a function of its arguments only."""
    return np.random.default_rng([_KNN_STREAM, seed, process_index, step])


@dataclasses.dataclass(frozen=True)
class Options:
    """How the host pipeline pairs each batch's noise: the `assignment` config section.

    Every field is checked on construction, whatever the method, so that a bad config
    fails at start-up rather than at the first batch.

    Attributes:
        method: a key of `METHODS` ("none", "linear", "knn").
        scope: "device": the batch's leading axis is split into `num_shards`
            contiguous equal shards (one per device, as the trainer shards it) and
            each is assigned on its own; "host": the whole batch at once. knn works
            row by row, so scope does not change what it does.
        num_shards: shards for scope "device".
        cost: "l2" or "sqeuclidean" (see `COSTS`).
        dtype: distance precision, "float32", "float16" or "bfloat16" (see `DTYPES`).
        scale: images are multiplied by this before the distance.
        k: knn candidates per image.
        solver: exact solver for "linear" ("auto" or a key of `SOLVERS`).
        seed: with the step and `process_index`, determines knn's draws, so a resumed
            run replays the same noise.
        process_index: this host's index in a multi-host run.
        group_key: if set (e.g. "label"), a permuting method pairs noise only among
            the rows of the same group (class) within each shard, so each class keeps
            exactly its own rows' Gaussian draws: the noise marginal stays Gaussian per
            class, not only over the whole batch.
    """

    method: str = "none"
    scope: str = "device"
    num_shards: int = 1
    cost: str = "l2"
    dtype: Any = "float32"
    scale: float = 1.0
    k: int = 4
    solver: str = "auto"
    seed: int = 0
    process_index: int = 0
    group_key: str | None = None

    def __post_init__(self):
        fn = _methods.lookup(_methods.METHODS, self.method)
        if self.scope not in SCOPES:
            raise ValueError(f"unknown assignment scope {self.scope!r}; expected one of {SCOPES}")
        n = self.num_shards
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {n!r}")
        for name in ("cost", "dtype", "scale", "k", "solver"):
            _methods.OPTION_CHECKS[name](getattr(self, name))
        if self.group_key is not None and self.method not in _methods.PERMUTATIONS:
            raise ValueError(f"group_key only applies to permuting methods, not "
                             f"{self.method!r}")
        del fn

    def method_options(self) -> dict[str, Any]:
        """The keyword options the method's function takes, with checked values."""
        fn = _methods.METHODS[self.method]
        given = {name: getattr(self, name) for name in ("cost", "dtype", "scale", "k", "solver")}
        checked = {name: _methods.OPTION_CHECKS[name](v) for name, v in given.items()}
        options = {n: v for n, v in checked.items() if n in _methods.option_names(fn)}
        if self.method in _methods.PERMUTATIONS:  # row-wise methods (knn) ignore scope
            options["shards"] = int(self.num_shards) if self.scope == "device" else 1
        return options


def make_batch_fn(options: Options) -> BatchFn:
    """Builds the host pipeline's per-batch assignment function.

    Args:
        options: the checked `Options`.

    Returns:
        `fn(batch, step)`, returning a new dict: `batch` (images "x", noise "z", and
        anything else, e.g. "label", passed through untouched) with "z" replaced by
        the assigned noise and the float diagnostics `DIAGNOSTIC_KEYS` added
        ("assignment/distance_before", "assignment/distance_after",
        "assignment/reduction", "assignment/seconds"; see `split_diagnostics`).

    Example:
        >>> import numpy as np
        >>> from assignment import Options, make_batch_fn
        >>> fn = make_batch_fn(Options("linear", scope="device", num_shards=2))
        >>> rng = np.random.default_rng(0)
        >>> batch = {"x": rng.normal(size=(8, 3)), "z": rng.normal(size=(8, 3)),
        ...          "label": np.arange(8)}
        >>> out = fn(batch, step=0)
        >>> bool(out["assignment/reduction"] > 0), bool((out["label"] == batch["label"]).all())
        (True, True)
    """
    method, seed, process_index = options.method, options.seed, options.process_index
    group_key, x_key, z_key = options.group_key, "x", "z"
    fn = _methods.METHODS[method]
    permute = _methods.PERMUTATIONS.get(method)
    options = options.method_options()

    def grouped(x: np.ndarray, z: np.ndarray, groups: np.ndarray) -> np.ndarray:
        n_shards = options["shards"]
        size = len(x) // n_shards
        sub = {**options, "shards": 1}
        perm = np.arange(len(x))
        for s in range(n_shards):
            lo = s * size
            for g in np.unique(groups[lo:lo + size]):
                rows = lo + np.flatnonzero(groups[lo:lo + size] == g)
                perm[rows] = rows[permute(x[rows], z[rows], **sub)]
        return perm

    def batch_fn(batch: Mapping[str, Any], step: int) -> dict[str, Any]:
        for key in (x_key, z_key) + ((group_key,) if group_key else ()):
            if key not in batch:
                raise ValueError(f"batch has no {key!r} key; it has {sorted(batch)}")
        x, z = _cost.check_pair(batch[x_key], batch[z_key])
        start = time.perf_counter()
        if group_key is not None:
            if len(x) % options["shards"]:
                raise ValueError(f"batch of {len(x)} does not split into "
                                 f"{options['shards']} equal shards")
            z_new = z[grouped(x, z, np.asarray(batch[group_key]))]
        elif permute is not None:
            z_new = z[permute(x, z, **options)]
        else:
            z_new = fn(x, z, rng=knn_rng(seed, step, process_index), **options)
        seconds = time.perf_counter() - start
        out = dict(batch)
        out[z_key] = z_new
        stats = _diagnostics.distance_stats(x, z, z_new)
        stats["seconds"] = seconds
        out.update({_diagnostics.PREFIX + name: value for name, value in stats.items()})
        return out

    return batch_fn
