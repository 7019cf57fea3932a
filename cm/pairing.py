"""Where noise meets assignment: the pipeline stage that pairs each batch's noise.

The `assignment` section is read once into a `Pairing`: on the host path
(`assignment.where=host`, the default) the batches from `cm.data.Batcher` are paired in
a `cm.data.Prefetcher` thread, `prefetch` batches ahead of the device, and placed on the
mesh there too; on the device path the host batch passes through and `device_fn` pairs
each device's shard inside the jitted step. The stage's per-batch function
(`make_batch_fn(Options(...))`) returns `(arrays, diagnostics)`: the batch with its noise
re-paired, and the image-noise distances before and after. Host and device diagnostics
are both `distance_stats` of `assignment.pair_distances`.
"""

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import assignment
from cm.data import Batcher, Prefetcher
from cm.runtime.views import AssignmentConfig, ConfigError

SCOPES = ("device", "host", "global")
# What the step reports of the pairing on the device path (assignment.where=device).
DEVICE_DIAGNOSTICS = {"distance_before", "distance_after", "reduction"}
# The keyword options each method's function takes (`assignment.permutation` for the
# permuting methods, `assignment.assign` for knn).
_OPTIONS = {"none": ("cost", "dtype", "scale"), "linear": ("cost", "dtype", "scale", "solver"),
            "knn": ("k", "cost", "dtype", "scale")}
_KNN_STREAM = 0x6B6E6E  # "knn": keeps knn's draws apart from any other (seed, step) stream.
_RESAMPLE_STREAM = 0x5253  # "RS": the resampled pairs' draws
# device_fn(x [b,H,W,C], z [b,H,W,C], key) -> z, applied to each device's shard.
DeviceFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# batch_fn(batch, step) -> (batch with z paired, {distance_before, distance_after,
# reduction, seconds}).
BatchFn = Callable[[Mapping[str, Any], int], tuple[dict[str, Any], dict[str, float]]]


def knn_rng(seed: int, step: int, process_index: int = 0) -> np.random.Generator:
    """The generator of knn's fresh draws at `step`: a function of its arguments only."""
    return np.random.default_rng([_KNN_STREAM, seed, process_index, step])


def distance_stats(x, z_before, z_after, xp=np) -> dict[str, Any]:
    """Mean image-noise distance before and after pairing, and the relative reduction.

    Plain L2 norms in float32 between the unscaled images and their noise, whatever
    cost, dtype and scale the pairing used: the geometry the network sees, and the
    quantity the paper reports (1.93-2.44% shorter on CIFAR-10 for batches 128-1024).
    `xp=jax.numpy` computes them inside a jitted step (then `reduction` is left to the
    caller, after averaging over devices).
    """
    if xp is np and len(x) == 0:
        return {"distance_before": 0.0, "distance_after": 0.0, "reduction": 0.0}
    before = xp.mean(assignment.pair_distances(x, z_before, xp))
    after = xp.mean(assignment.pair_distances(x, z_after, xp))
    if xp is not np:
        return {"distance_before": before, "distance_after": after}
    before, after = float(before), float(after)
    reduction = 1.0 - after / before if before > 0 else 0.0
    return {"distance_before": before, "distance_after": after, "reduction": reduction}


@dataclasses.dataclass(frozen=True)
class Options:
    """How the host stage pairs each batch's noise, checked on construction.

    Attributes:
      method: a key of `assignment.METHODS` ("none", "linear", "knn").
      scope: "device": the batch's leading axis is split into `num_shards` contiguous
        equal shards (one per device, as the trainer shards it) and each is paired on
        its own; "host" and "global": the whole batch it is given at once (`Pairing`
        gives the global scope the whole global batch on every process). knn works row
        by row, so scope does not change what it does.
      num_shards: shards for scope "device".
      cost, dtype, scale, k, solver: the method's options (see `assignment.assign`).
      seed: with the step and `process_index`, determines knn's draws, so a resumed run
        replays the same noise.
      process_index: this host's index in a multi-host run.
      group_key: if set (e.g. "label"), a permuting method pairs noise only among the
        rows of the same group (class) within each shard, so each class keeps exactly
        its own rows' Gaussian draws.
      resample: after a permuting method, draw the batch's pairs again with replacement
        from the paired batch, each shard from its own pairs (what torchcfm's OT-CFM does
        with the exact plan, which for a batch of equal weights is a permutation: some
        (image, noise) pairs then appear twice and others not at all). Off by default:
        the pairing alone keeps every image once and the noise exactly Gaussian.
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
    resample: bool = False

    def __post_init__(self):
        if self.method not in assignment.METHODS:
            raise ValueError(f"unknown assignment method {self.method!r}; expected one of "
                             f"{tuple(assignment.METHODS)}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown assignment scope {self.scope!r}; expected one of {SCOPES}")
        n = self.num_shards
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {n!r}")
        if self.cost not in assignment.COSTS:
            raise ValueError(f"unknown cost {self.cost!r}; expected one of {assignment.COSTS}")
        if str(self.dtype) not in assignment.DTYPES:
            raise ValueError(f"unknown distance dtype {self.dtype!r}; expected one of "
                             f"{tuple(assignment.DTYPES)}")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale)
                and self.scale > 0):
            raise ValueError(f"scale must be finite and positive, got {self.scale!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.solver != "auto" and self.solver not in assignment.SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; expected 'auto' or one of "
                             f"{tuple(assignment.SOLVERS)}")
        if self.group_key is not None and self.method not in assignment.PERMUTING:
            raise ValueError(f"group_key only applies to permuting methods, not "
                             f"{self.method!r}")
        if self.resample and self.method not in assignment.PERMUTING:
            raise ValueError(f"resample draws from a pairing (a permutation), not from "
                             f"{self.method!r}'s selection")

    @property
    def shards(self) -> int:
        """Independent problems per batch: the device shards, or 1 for the host scope."""
        return int(self.num_shards) if self.scope == "device" else 1

    def method_options(self) -> dict[str, Any]:
        """The keyword options the method's function takes."""
        options = {name: getattr(self, name) for name in _OPTIONS[self.method]}
        if self.method in assignment.PERMUTING:
            options["shards"] = self.shards
        return options


def make_batch_fn(options: Options) -> BatchFn:
    """The host stage's per-batch function, `fn(batch, step) -> (arrays, diagnostics)`.

    `batch` holds images "x", noise "z" and anything else (e.g. "label"), which passes
    through untouched: only the noise is re-paired, so every other key stays paired
    with its image. The diagnostics are `distance_stats` and the pairing's `seconds`.

    Example:
        >>> import numpy as np
        >>> from cm.pairing import Options, make_batch_fn
        >>> fn = make_batch_fn(Options("linear", scope="device", num_shards=2))
        >>> rng = np.random.default_rng(0)
        >>> batch = {"x": rng.normal(size=(8, 3)), "z": rng.normal(size=(8, 3)),
        ...          "label": np.arange(8)}
        >>> arrays, stats = fn(batch, step=0)
        >>> bool(stats["reduction"] > 0), bool((arrays["label"] == batch["label"]).all())
        (True, True)
    """
    method, group_key = options.method, options.group_key
    method_options = options.method_options()
    seed, process_index = options.seed, options.process_index

    def grouped(x: np.ndarray, z: np.ndarray, groups: np.ndarray) -> np.ndarray:
        n_shards = options.shards
        size = len(x) // n_shards
        sub = {**method_options, "shards": 1}
        perm = np.arange(len(x))
        for s in range(n_shards):
            lo = s * size
            for g in np.unique(groups[lo:lo + size]):
                rows = lo + np.flatnonzero(groups[lo:lo + size] == g)
                perm[rows] = rows[assignment.permutation(x[rows], z[rows], method, **sub)]
        return perm

    def batch_fn(batch: Mapping[str, Any], step: int) -> tuple[dict, dict[str, float]]:
        for key in ("x", "z") + ((group_key,) if group_key else ()):
            if key not in batch:
                raise ValueError(f"batch has no {key!r} key; it has {sorted(batch)}")
        x, z = np.asarray(batch["x"]), np.asarray(batch["z"])
        start = time.perf_counter()
        if group_key is not None:
            if len(x) % options.shards:
                raise ValueError(f"batch of {len(x)} does not split into "
                                 f"{options.shards} equal shards")
            z_new = z[grouped(x, z, np.asarray(batch[group_key]))]
        elif method in assignment.PERMUTING:
            z_new = z[assignment.permutation(x, z, method, **method_options)]
        else:
            z_new = assignment.assign(x, z, method, rng=knn_rng(seed, step, process_index),
                                      **method_options)
        out = {**batch, "z": z_new}
        if options.resample:
            rng = np.random.default_rng([_RESAMPLE_STREAM, seed, process_index, step])
            size = len(x) // options.shards
            idx = np.concatenate([s * size + rng.integers(0, size, size)
                                  for s in range(options.shards)])
            out = {name: np.asarray(v)[idx] for name, v in out.items()}
        seconds = time.perf_counter() - start
        stats = distance_stats(x, z, z_new) if not options.resample else distance_stats(
            out["x"], z[idx], out["z"])
        stats["seconds"] = seconds
        return out, stats

    return batch_fn


MAX_KNN_CANDIDATES_GB = 4.0  # host (or device) memory knn's candidates may take


def check_knn_memory(a: AssignmentConfig, rows: int, row_size: int) -> None:
    """Refuses a knn `k` whose candidates would not fit: `rows` images of `row_size` values
    each get k noise candidates, float32, drawn then gathered (two copies)."""
    if a.method != "knn":
        return
    per_k = rows * row_size * 4 * 2
    need_gb, max_k = a.k * per_k / 2**30, int(MAX_KNN_CANDIDATES_GB * 2**30 // per_k)
    if need_gb > MAX_KNN_CANDIDATES_GB:
        raise ConfigError(
            f"assignment.k={a.k} needs {need_gb:.1f} GiB for knn's noise candidates ({rows} "
            f"images x {row_size} values x k, float32, twice); the limit is "
            f"{MAX_KNN_CANDIDATES_GB:g} GiB: use k <= {max_k}")


def host_options(a: AssignmentConfig, seed: int, num_shards: int,
                 process_index: int) -> Options:
    """The host stage's options: the configured method, or "none" on the device path."""
    method = a.method if a.where == "host" else "none"
    try:
        return Options(method, scope=a.scope, num_shards=num_shards, cost=a.cost,
                       dtype=a.dtype, scale=a.scale, k=a.k, solver=a.solver, seed=seed,
                       process_index=process_index,
                       group_key="label" if a.within_class and method != "none" else None,
                       resample=a.resample)
    except ValueError as e:
        raise ConfigError(f"assignment: {e}") from e


def check(a: AssignmentConfig) -> None:
    """The `assignment` section's values, as the stage will read them (ConfigError)."""
    host_options(a, seed=0, num_shards=1, process_index=0)
    if a.scope not in SCOPES:
        raise ConfigError(f"assignment.scope must be one of {SCOPES}, got {a.scope!r}")
    if a.where == "device" and a.method not in assignment.DEVICE_METHODS:
        raise ConfigError(f"assignment.method={a.method!r} has no on-device version; "
                          f"device methods are {tuple(assignment.DEVICE_METHODS)}")


class Pairing:
    """The `assignment` section, read once: the host stage and the in-step function.

    `scope=global` (the paper's setting): every process builds the whole global batch
    (its images, flips and noise are functions of (seed, step, global row), so no process
    needs another's data), pairs it as one problem, and keeps its own rows; every process
    arrives at the same permutation (the solvers are deterministic), and knn draws its
    candidates as process 0 would, so the run does not depend on the process layout.
    The cost: each process reads and pairs the global batch (`bench/global_scope.py`).
    """

    def __init__(self, a: AssignmentConfig, seed: int, num_local_devices: int,
                 process_index: int = 0, process_count: int = 1):
        self.prefetch = a.prefetch
        self.section = a
        self.scope = a.scope
        self.process_index, self.process_count = process_index, process_count
        # The global scope pairs the global batch as process 0 of a one-process run would.
        self.options = host_options(a, seed, num_local_devices,
                                    0 if a.scope == "global" else process_index)
        self.device_fn: DeviceFn | None = None
        if a.where == "device" and a.method != "none":
            def device_fn(x, z, key):
                return assignment.device_assign(x, z, a.method, key=key, k=a.k, cost=a.cost,
                                                dtype=a.dtype, scale=a.scale)

            self.device_fn = device_fn

    def describe(self, global_batch: int, devices: int) -> str:
        """One line for the log: what is paired with what, in problems of which size."""
        o, method = self.section, self.section.method
        if method == "none":
            return "none (vanilla: the noise as drawn)"
        if self.device_fn is not None:
            return (f"{method} inside the step, each of {devices} devices its shard of "
                    f"{global_batch // devices}")
        if method == "knn":
            return f"knn, k={o.k}, row by row ({o.cost}, {o.dtype})"
        size = {"device": global_batch // devices,
                "host": global_batch // self.process_count, "global": global_batch}[o.scope]
        where = {"device": "each device's shard", "host": "each host's batch",
                 "global": "the global batch on every process"}[o.scope]
        return (f"{method} over {where}: {size}x{size} problems ({o.cost}, {o.dtype}); its "
                "seconds per step are the log's `seconds`")

    def inputs(self, batcher: Batcher, start_step: int, place: Callable[[dict], dict],
               steps_per_item: int = 1) -> Prefetcher:
        """The paired batches from `start_step`, as an iterator and context manager.

        Each item is `{"batch": arrays on the mesh (a tuple of k with steps_per_item=k),
        "diagnostics": [one dict per step]}`. `place(arrays) -> arrays` (e.g.
        `shard_batch` onto the mesh) runs in the prefetcher's thread, so the
        host-to-device copy of the next batches overlaps the current step instead of
        delaying its dispatch; `Prefetcher.stats()` gives the time the trainer waited.
        With k > 1 each item holds k consecutive steps' batches, each paired as alone.
        """
        batch_fn = make_batch_fn(self.options)
        k = steps_per_item
        rows = None
        if self.scope == "global" and self.process_count > 1 and self.device_fn is None:
            host = batcher
            batcher = Batcher(host.images, host.global_batch, host.seed, 0, 1,
                              host.random_flip, labels=host.labels, flipped=host.flipped)
            rows = slice(host.row_start, host.row_start + host.host_batch)

        def paired(group: list[dict], index: int) -> dict:
            first = start_step + (index - start_step) * k  # the Prefetcher counts items
            arrays, diagnostics = [], []
            for i, batch in enumerate(group):
                if self.device_fn is not None:  # the step pairs and measures: pass it on
                    arrays.append(batch)
                    diagnostics.append({})
                    continue
                a, d = batch_fn(batch, first + i)
                if rows is not None:  # the global batch was paired: keep this host's rows
                    a = {name: v[rows] for name, v in a.items()}
                arrays.append(a)
                diagnostics.append(d)
            if k == 1:
                return {"batch": place(arrays[0]), "diagnostics": diagnostics}
            return {"batch": tuple(place(a) for a in arrays), "diagnostics": diagnostics}

        return Prefetcher(_groups(batcher(start_step), k), paired, start_step=start_step,
                          prefetch=self.prefetch, name="pairing")


def device_diagnostics(x: jax.Array, z: jax.Array, paired: jax.Array) -> dict[str, jax.Array]:
    """The device path's `distance_stats`, averaged over the `data` axis (inside a
    shard_map over the mesh)."""
    stats = distance_stats(x, z, paired, jnp)
    return {k: jax.lax.pmean(v, "data") for k, v in stats.items()}


def _groups(batches: Iterator[dict], k: int) -> Iterator[list[dict]]:
    """Consecutive batches in lists of k."""
    while True:
        group = list(itertools.islice(batches, k))
        if len(group) < k:
            return
        yield group
