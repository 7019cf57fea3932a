"""Connects the deterministic host batches to the assignment stage of `assignment/`.

The host path pairs noise with images in a background thread, `prefetch` batches
ahead of the device; the device path leaves the host batch alone and returns a
jittable function that the train step applies to each device's shard.
"""

from collections.abc import Callable

import jax
import ml_collections

import assignment
from cm import data

SCOPES = ("device", "host")
WHERE = ("host", "device")


def check_assignment_config(a: ml_collections.ConfigDict) -> None:
    if a.method not in assignment.METHODS:
        raise ValueError(f"unknown assignment.method {a.method!r}; expected one of "
                         f"{sorted(assignment.METHODS)}")
    if a.scope not in SCOPES:
        raise ValueError(f"assignment.scope must be one of {SCOPES}, got {a.scope!r}")
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


def make_input(config: ml_collections.ConfigDict, batcher: data.Batcher, start_step: int,
               num_local_devices: int, place: Callable[[dict], dict] | None = None,
               ) -> assignment.Pipeline:
    """The iterator of batches from `start_step`, as a context manager.

    Each item is a dict with `x`, `z` (assigned on the host path), `label` if the data
    has labels, and the scalar diagnostics `assignment/...` (see
    `assignment.split_diagnostics`). `place(arrays) -> arrays`, e.g. `shard_batch` onto
    the mesh, runs in the pipeline's thread too, so the host-to-device copy of the next
    batches overlaps the current step instead of delaying its dispatch.
    """
    a = config.assignment
    method = a.method if a.where == "host" else "none"
    batch_fn = assignment.make_batch_fn(
        method, scope=a.scope, num_shards=num_local_devices, cost=a.cost, dtype=a.dtype,
        scale=a.scale, k=a.k, solver=a.solver, seed=config.training.seed,
        process_index=jax.process_index(),
        group_key="label" if a.within_class and method != "none" else None)
    if place is not None:
        batch_fn = _then_place(batch_fn, place)
    return assignment.Pipeline(batcher(start_step), batch_fn, start_step=start_step,
                               prefetch=a.prefetch)


def _then_place(batch_fn, place):
    def fn(batch: dict, step: int) -> dict:
        out = batch_fn(batch, step)
        arrays, _ = assignment.split_diagnostics(out)
        return {**out, **place(arrays)}

    return fn


def device_assign_fn(a: ml_collections.ConfigDict):
    """`fn(x, z, key) -> z` for the in-step path, or None on the host path."""
    if a.where != "device" or a.method == "none":
        return None
    def assign(x, z, key):
        return assignment.device_assign(x, z, a.method, key=key, k=a.k, cost=a.cost,
                                        dtype=a.dtype, scale=a.scale)

    return assign
