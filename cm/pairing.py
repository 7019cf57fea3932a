"""Where noise meets assignment: the one place the trainer pairs a batch's noise.

The `assignment` config section is read once into a `Pairing`: on the host path
(`assignment.where=host`, the default) the batches from `cm.data.Batcher` are paired
in the `assignment.Pipeline` thread, `prefetch` batches ahead of the device, their
distance diagnostics split off there, and the arrays placed on the mesh there too; on
the device path the host batch passes through and `device_fn` pairs each device's
shard inside the jitted step. Each item of `Pairing.inputs` is one step's
`{"batch": arrays on the mesh, "diagnostics": {name: float}}`.
"""

import itertools
from collections.abc import Callable, Iterator

import jax
import ml_collections

import assignment
from cm.data import Batcher

WHERE = ("host", "device")
# device_fn(x [b,H,W,C], z [b,H,W,C], key) -> z, applied to each device's shard.
DeviceFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def check_config(a: ml_collections.ConfigDict) -> None:
    """Errors in the `assignment` section that `assignment.Options` cannot see alone."""
    if a.method not in assignment.METHODS:
        raise ValueError(f"unknown assignment.method {a.method!r}; expected one of "
                         f"{sorted(assignment.METHODS)}")
    if a.where not in WHERE:
        raise ValueError(f"assignment.where must be one of {WHERE}, got {a.where!r}")
    if a.where == "device" and a.scope != "device":
        raise ValueError("assignment.where='device' assigns within each device's shard: "
                         "it needs assignment.scope='device'")
    if a.within_class and a.method == "knn":
        raise ValueError("assignment.within_class applies to permuting methods (linear), "
                         "not knn (which pairs each image with its own candidates)")
    if a.within_class and a.where == "device":
        raise ValueError("assignment.within_class runs on the host path only "
                         "(assignment.where='host')")
    if a.k < 1:
        raise ValueError(f"assignment.k must be >= 1, got {a.k}")
    if a.prefetch < 1:
        raise ValueError(f"assignment.prefetch must be >= 1, got {a.prefetch}")
    host_options(a, seed=0, num_shards=1, process_index=0)  # the remaining value checks


def host_options(a: ml_collections.ConfigDict, seed: int, num_shards: int,
                 process_index: int) -> assignment.Options:
    """The host stage's options: the configured method, or "none" on the device path."""
    method = a.method if a.where == "host" else "none"
    return assignment.Options(
        method, scope=a.scope, num_shards=num_shards, cost=a.cost, dtype=a.dtype,
        scale=a.scale, k=a.k, solver=a.solver, seed=seed, process_index=process_index,
        group_key="label" if a.within_class and method != "none" else None)


MAX_KNN_CANDIDATES_GB = 4.0  # host (or device) memory knn's candidates may take


def check_knn_memory(a: ml_collections.ConfigDict, rows: int, row_size: int) -> None:
    """Refuses a knn `k` whose candidates would not fit: `rows` images of `row_size` values
    each get k noise candidates, float32, drawn then gathered (two copies)."""
    if a.method != "knn":
        return
    per_k = rows * row_size * 4 * 2
    need_gb, max_k = a.k * per_k / 2**30, int(MAX_KNN_CANDIDATES_GB * 2**30 // per_k)
    if need_gb > MAX_KNN_CANDIDATES_GB:
        raise ValueError(
            f"assignment.k={a.k} needs {need_gb:.1f} GiB for knn's noise candidates ({rows} "
            f"images x {row_size} values x k, float32, twice); the limit is "
            f"{MAX_KNN_CANDIDATES_GB:g} GiB: use k <= {max_k}")


class Pairing:
    """The `assignment` section, read once: the host stage and the in-step function."""

    def __init__(self, config: ml_collections.ConfigDict, num_local_devices: int):
        check_config(config.assignment)
        a = config.assignment
        self.prefetch = a.prefetch
        self.options = host_options(a, config.training.seed, num_local_devices,
                                    jax.process_index())
        self.device_fn: DeviceFn | None = None
        if a.where == "device" and a.method != "none":
            def device_fn(x, z, key):
                return assignment.device_assign(x, z, a.method, key=key, k=a.k, cost=a.cost,
                                                dtype=a.dtype, scale=a.scale)

            self.device_fn = device_fn

    def inputs(self, batcher: Batcher, start_step: int, place: Callable[[dict], dict],
               steps_per_item: int = 1) -> assignment.Pipeline:
        """The paired batches from `start_step`, as an iterator and context manager.

        `place(arrays) -> arrays` (e.g. `shard_batch` onto the mesh) runs in the
        pipeline's thread, so the host-to-device copy of the next batches overlaps the
        current step instead of delaying its dispatch. `Pipeline.stats()` gives the
        time the trainer waited for them. With `steps_per_item = k > 1` each item holds
        a tuple of k consecutive steps' paired batches (each paired exactly as alone)
        and their k diagnostics.
        """
        batch_fn = assignment.make_batch_fn(self.options)
        k = steps_per_item

        def paired(group: list[dict], index: int) -> dict:
            first = start_step + (index - start_step) * k  # the Pipeline counts items
            arrays, diagnostics = [], []
            for i, batch in enumerate(group):
                if self.device_fn is not None:  # the step pairs and measures: pass it on
                    arrays.append(batch)
                    diagnostics.append({})
                    continue
                a, d = assignment.split_diagnostics(batch_fn(batch, first + i))
                arrays.append(a)
                diagnostics.append(d)
            if k == 1:
                return {"batch": place(arrays[0]), "diagnostics": diagnostics}
            return {"batch": tuple(place(a) for a in arrays), "diagnostics": diagnostics}

        return assignment.Pipeline(_groups(batcher(start_step), k), paired,
                                   start_step=start_step, prefetch=self.prefetch)


def _groups(batches: Iterator[dict], k: int) -> Iterator[list[dict]]:
    """Consecutive batches in lists of k."""
    while True:
        group = list(itertools.islice(batches, k))
        if len(group) < k:
            return
        yield group
