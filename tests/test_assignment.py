"""Tests of assignment/: exactness against scipy, knn, device variants; and of the
pipeline stage that calls it (cm.pairing's batch functions)."""

import doctest
import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from sklearn.datasets import load_digits

import assignment
from assignment import (
    _cost,
    _device,
    _diagnostics,
    _knn,
    _linear,
    _methods,
)
from cm import pairing
from cm.pairing import Options, distance_stats, make_batch_fn

SIZES = (0, 1, 2, 7, 64, 257)
QUANTIZED = ("float16", "bfloat16")


def _pair(n, shape=(3, 4, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
    z = rng.standard_normal((n, *shape)).astype(np.float32)
    return x, z


@functools.cache
def _digits():
    images = load_digits().images.astype(np.float32)  # [1797, 8, 8], 0..16
    return images[..., None] / 8.0 - 1.0  # [N, 8, 8, 1] in [-1, 1]


def _digit_batch(n, seed):
    rng = np.random.default_rng(seed)
    x = _digits()[rng.choice(len(_digits()), n, replace=False)]
    return x, rng.standard_normal(x.shape).astype(np.float32)


def _total(c, perm):
    return float(np.asarray(c, np.float64)[np.arange(len(perm)), perm].sum())


def _optimum(c):
    rows, cols = scipy.optimize.linear_sum_assignment(np.asarray(c, np.float64))
    return float(np.asarray(c, np.float64)[rows, cols].sum())


def _assert_permutation(perm, n):
    assert perm.shape == (n,)
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))


def _assert_optimal(c, perm, rtol=1e-6):
    opt = _optimum(c)
    assert _total(c, perm) <= opt + rtol * max(1.0, abs(opt)), (_total(c, perm), opt)


# Exact methods -------------------------------------------------------------------


@pytest.mark.parametrize("solver", _linear.available_solvers())
@pytest.mark.parametrize("n", SIZES)
def test_linear_reaches_scipy_optimum(solver, n):
    x, z = _pair(n, seed=n)
    for cost in assignment.COSTS:
        for dtype in assignment.DTYPES:
            perm = assignment.permutation(x, z, "linear", cost=cost, dtype=dtype, solver=solver)
            _assert_permutation(perm, n)
            c = _cost.cost_matrix(x, z, cost=cost, dtype=dtype)
            # lapjvs works in float32 arithmetic: exact on quantized costs only.
            rtol = 1e-5 if solver == "lapjvs" and dtype == "float32" else 1e-6
            _assert_optimal(c, perm, rtol)


@pytest.mark.parametrize("solver", _linear.available_solvers())
def test_linear_with_ties(solver):
    rng = np.random.default_rng(1)
    for n in (2, 7, 64):
        x = rng.integers(-2, 3, (n, 6)).astype(np.float32)
        x[n // 2 :] = x[: n - n // 2]  # Duplicate images.
        z = rng.integers(-2, 3, (n, 6)).astype(np.float32)
        z[: n // 3] = z[0]  # Duplicate noises.
        for cost in assignment.COSTS:
            perm = assignment.permutation(x, z, "linear", cost=cost, solver=solver)
            _assert_permutation(perm, n)
            _assert_optimal(_cost.cost_matrix(x, z, cost=cost), perm)
    x = np.ones((5, 3), np.float32)  # Every pairing is optimal.
    _assert_permutation(assignment.permutation(x, x, "linear", solver=solver), 5)


@pytest.mark.parametrize("n", (64, 257))
def test_linear_on_digits(n):
    x, z = _digit_batch(n, seed=n)
    for dtype in assignment.DTYPES:
        for scale in (1.0, 0.5):
            perm = assignment.permutation(x, z, "linear", dtype=dtype, scale=scale)
            _assert_permutation(perm, n)
            _assert_optimal(_cost.cost_matrix(x, z, dtype=dtype, scale=scale), perm)
    out = assignment.assign(x, z, "linear", dtype="float16")
    stats = distance_stats(x, z, out)
    assert 0 < stats["reduction"] < 0.5
    assert stats["distance_after"] < stats["distance_before"]


def test_assign_is_z_permuted():
    x, z = _pair(33)
    for method in _methods.PERMUTATIONS:
        perm = assignment.permutation(x, z, method)
        out = assignment.assign(x, z, method)
        _assert_permutation(perm, 33)
        np.testing.assert_array_equal(out, z[perm])
        assert out.shape == z.shape and out.dtype == z.dtype
        assert not np.shares_memory(out, z)
    np.testing.assert_array_equal(assignment.permutation(x, z, "none"), np.arange(33))


def test_sqeuclidean_ignores_norms():
    # Only inner products matter: shifting the noise norms changes no pairing.
    x, z = _pair(40, shape=(5,))
    c = _cost.cost_matrix(x, z, cost="sqeuclidean")
    perm = assignment.permutation(x, z, "linear", cost="sqeuclidean")
    _assert_optimal(c, perm)
    np.testing.assert_allclose(c, ((x[:, None] - z[None]) ** 2).sum(-1), rtol=1e-5, atol=1e-4)


def test_quantized_costs_follow_the_recipe():
    # float32 distances of the unrounded inputs, each rounded to the dtype.
    x, z = _pair(9, shape=(20,))
    for cost in assignment.COSTS:
        for dtype, np_dtype in assignment.DTYPES.items():
            c = _cost.cost_matrix(x, z, cost=cost, dtype=dtype, scale=0.1)
            exact = (((0.1 * x[:, None].astype(np.float64)) - z[None]) ** 2).sum(-1)
            exact = np.sqrt(exact) if cost == "l2" else exact
            np.testing.assert_array_equal(c, c.astype(np_dtype).astype(np.float32))
            rounded = exact.astype(np.float32).astype(np_dtype).astype(np.float32)
            ulp = np.spacing(rounded.astype(np_dtype)).astype(np.float32)
            if dtype == "float32":  # |x|^2 + |z|^2 - 2<x, z> loses a few float32 bits.
                np.testing.assert_allclose(c, exact, rtol=1e-5, atol=1e-5)
            else:  # float32 sums can tip a rounding tie, rarely.
                assert (np.abs(c - rounded) <= ulp).all()
                assert (c == rounded).mean() > 0.95
    scaled = _cost.cost_matrix(x, z, scale=0.1)
    np.testing.assert_allclose(scaled, _cost.cost_matrix(x * 0.1, z), rtol=1e-6)
    with pytest.raises(ValueError, match="overflow float16"):
        _cost.cost_matrix(x * 300, z, cost="sqeuclidean", dtype="float16")


def test_quantize_matches_numpy_casts():
    from assignment._cost import quantize

    rng = np.random.default_rng(0)
    a = np.concatenate(
        [
            rng.standard_normal(10_000) * 10.0 ** rng.integers(-9, 4, 10_000),
            [0.0, -0.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 65504.0, 65519.0, 1e-45, 2047.99],
        ]
    ).astype(np.float32)
    for dtype, np_dtype in assignment.DTYPES.items():
        np.testing.assert_array_equal(
            quantize(a, dtype).view(np.uint32),
            a.astype(np_dtype).astype(np.float32).view(np.uint32),
        )


def test_numpy_fallback_matches_xla(monkeypatch):
    # Where JAX has no CPU backend, the host path computes the same costs in numpy.
    from assignment import _cost

    x, z = _pair(20, seed=4)
    cand = np.random.default_rng(0).standard_normal((20, 3, 48)).astype(np.float32)
    want = {}
    for cost in assignment.COSTS:
        for dtype in assignment.DTYPES:
            opts = {"cost": cost, "dtype": dtype, "scale": 0.7}
            want[cost, dtype] = (
                _cost.cost_matrix(x, z, **opts),
                _cost.pair_costs(x.reshape(20, -1), cand, **opts),
            )
    monkeypatch.setattr(_cost, "_cpu", lambda: None)
    for (cost, dtype), (matrix, pairs) in want.items():
        opts = {"cost": cost, "dtype": dtype, "scale": 0.7}
        np_dtype = assignment.DTYPES[dtype]
        for got, ref in (
            (_cost.cost_matrix(x, z, **opts), matrix),
            (_cost.pair_costs(x.reshape(20, -1), cand, **opts), pairs),
        ):
            ulp = np.spacing(np.abs(ref).astype(np_dtype)).astype(np.float32)
            assert (np.abs(got - ref) <= np.maximum(ulp, 1e-5 * np.abs(ref) + 1e-5)).all()
    with pytest.raises(ValueError, match="overflow float16"):
        _cost.cost_matrix(x * 300, z, cost="sqeuclidean", dtype="float16")


def test_solve_small_matrix():
    c = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    for solver in _linear.available_solvers():
        np.testing.assert_array_equal(_linear.solve(c, solver), [1, 0, 2])
    assert _linear.resolve_solver("auto") in _linear.available_solvers()


# knn -----------------------------------------------------------------------------


def test_knn_keeps_the_nearest_candidate():
    x, z = _digit_batch(50, seed=3)
    for cost in assignment.COSTS:
        for dtype, np_dtype in assignment.DTYPES.items():
            out = assignment.assign(
                x, z, "knn", k=4, rng=np.random.default_rng(7), cost=cost, dtype=dtype
            )
            cand = _knn.knn_candidates(z, 4, np.random.default_rng(7))  # [B, 4, ...]
            np.testing.assert_array_equal(cand[:, 0], z)
            kept = _rows_of(out[:, None].repeat(4, 1).reshape(-1, 64), cand.reshape(-1, 64))
            assert (kept // 4 == np.repeat(np.arange(50), 4)).all()  # Its own candidates.
            # Exact distances of the rounded inputs, within one unit of `dtype`.
            xs = x.astype(np_dtype).astype(np.float64).reshape(50, 1, -1)
            cs = cand.astype(np_dtype).astype(np.float64).reshape(50, 4, -1)
            d = ((xs - cs) ** 2).sum(-1)
            d = np.sqrt(d) if cost == "l2" else d
            chosen = d[np.arange(50), kept[::4] % 4]
            tol = 2 * np.spacing(d.min(axis=1).astype(np_dtype)).astype(np.float64) + 1e-9
            assert (chosen <= d.min(axis=1) + tol).all()
    assert distance_stats(x, z, out)["reduction"] > 0


def test_knn_k1_is_none_and_not_a_permutation():
    x, z = _pair(16)
    np.testing.assert_array_equal(assignment.assign(x, z, "knn", k=1), z)
    out = assignment.assign(x, z, "knn", k=8, rng=np.random.default_rng(0))
    assert out.shape == z.shape and out.dtype == z.dtype
    assert not np.array_equal(np.sort(out, axis=None), np.sort(z, axis=None))


# Device variants -------------------------------------------------------------------


def test_device_costs_match_host():
    x, z = _pair(31, seed=2)
    for cost in assignment.COSTS:
        for dtype, np_dtype in assignment.DTYPES.items():
            host = _cost.cost_matrix(x, z, cost=cost, dtype=dtype, scale=0.5)
            dev = jax.jit(
                functools.partial(_device.device_cost_matrix, cost=cost, dtype=dtype, scale=0.5)
            )(x, z)
            ulp = np.spacing(np.abs(host).astype(np_dtype)).astype(np.float32)
            tol = np.maximum(2 * ulp, 1e-5 * np.abs(host) + 1e-4)  # Input rounding.
            assert (np.abs(np.asarray(dev) - host) <= tol).all()


@pytest.mark.parametrize("n", (0, 1, 2, 7, 64))
def test_device_linear_is_optimal_under_jit(n):
    x, z = _pair(n, seed=n + 10)
    for dtype in ("float32", "float16"):
        fn = jax.jit(functools.partial(_device.device_permutation, dtype=dtype))
        perm = np.asarray(fn(x, z))
        _assert_permutation(perm, n)
        c = np.asarray(_device.device_cost_matrix(x, z, dtype=dtype))
        _assert_optimal(c, perm, rtol=1e-5)
        host = assignment.permutation(x, z, "linear", dtype=dtype)
        # Same optimum as the host; the device costs may differ by an ulp.
        np.testing.assert_allclose(_total(c, perm), _total(c, host), rtol=1e-4)


def test_device_linear_under_vmap_agrees_with_host_shards():
    shards, n = 4, 16
    x, z = _digit_batch(shards * n, seed=5)
    traced = chex.assert_max_traces(
        lambda x, z: jax.vmap(functools.partial(assignment.device_assign, method="linear"))(x, z),
        n=1,
    )
    fn = jax.jit(traced)
    out = np.asarray(fn(x.reshape(shards, n, 8, 8, 1), z.reshape(shards, n, 8, 8, 1)))
    fn(z.reshape(shards, n, 8, 8, 1), x.reshape(shards, n, 8, 8, 1))  # No retrace.
    batch_fn = make_batch_fn(Options("linear", "device", shards))
    host = batch_fn({"x": x, "z": z}, 0)[0]["z"].reshape(shards, n, 8, 8, 1)
    for s in range(shards):
        xs, zs = x[s * n : (s + 1) * n], z[s * n : (s + 1) * n]
        c = _cost.cost_matrix(xs, zs)
        d_dev = _diagnostics.pair_distances(xs, out[s]).sum()
        d_host = _diagnostics.pair_distances(xs, host[s]).sum()
        np.testing.assert_allclose(d_dev, d_host, rtol=1e-5)
        _assert_permutation(_rows_of(out[s], zs), n)
        _assert_optimal(c, _rows_of(out[s], zs), rtol=1e-5)


def _rows_of(out, z):
    """perm with z[perm] == out, for z with distinct rows."""
    flat_z, flat_out = z.reshape(len(z), -1), out.reshape(len(out), -1)
    return np.array([np.flatnonzero((flat_z == row).all(axis=1))[0] for row in flat_out])


def test_device_knn_matches_host_selection():
    x, z = _digit_batch(40, seed=9)
    key = jax.random.key(3)
    cand = np.asarray(_device.device_knn_candidates(z, 4, key))
    np.testing.assert_array_equal(cand[:, 0], z)
    for dtype in ("float32", "float16"):
        host = _knn.nearest(x, cand, dtype=dtype)
        dev = np.asarray(
            jax.jit(functools.partial(_device.device_nearest, dtype=dtype))(x, cand)
        )
        assert (host == dev).mean() >= 0.95  # Ulp-level differences may flip near ties.
    fn = jax.jit(functools.partial(assignment.device_assign, method="knn", k=4))
    out = np.asarray(fn(x, z, key=key))
    np.testing.assert_array_equal(out, cand[np.arange(40), _knn.nearest(x, cand)])
    # vmap over shards, one key per shard.
    keys = jax.random.split(key, 2)
    vfn = jax.jit(jax.vmap(functools.partial(assignment.device_assign, method="knn", k=3)))
    vout = np.asarray(vfn(x.reshape(2, 20, 8, 8, 1), z.reshape(2, 20, 8, 8, 1), key=keys))
    for s in range(2):
        c = np.asarray(_device.device_knn_candidates(z[s * 20 : (s + 1) * 20], 3, keys[s]))
        want = c[np.arange(20), _knn.nearest(x[s * 20 : (s + 1) * 20], c)]
        np.testing.assert_array_equal(vout[s], want)


def test_device_none_and_errors():
    x, z = _pair(4)
    np.testing.assert_array_equal(
        jax.jit(assignment.device_assign, static_argnums=2)(x, z, "none"), z
    )
    with pytest.raises(ValueError, match="unknown assignment method 'hungarian'"):
        assignment.device_assign(x, z, "hungarian")
    with pytest.raises(ValueError, match="same"):
        assignment.device_assign(x, z[:3], "linear")
    with pytest.raises(ValueError, match="needs key"):
        assignment.device_assign(x, z, "knn")
    with pytest.raises(ValueError, match="unknown distance dtype"):
        assignment.device_assign(x, z, "linear", dtype="int8")
    assert jnp.asarray(_device.device_permutation(x, z, "none")).tolist() == [0, 1, 2, 3]


# Batch functions -------------------------------------------------------------------


def test_batch_fn_diagnostics_and_passthrough():
    x, z = _digit_batch(32, seed=11)
    labels = np.arange(32)
    batch = {"x": x, "z": z, "label": labels}
    for method in assignment.METHODS:
        arrays, stats = make_batch_fn(Options(method, "host", seed=1))(batch, 3)
        assert arrays["x"] is x and arrays["label"] is labels  # Untouched, still paired.
        assert set(arrays) == {"x", "z", "label"}
        assert set(stats) == {"distance_before", "distance_after", "reduction", "seconds"}
        np.testing.assert_allclose(
            stats["distance_before"], _diagnostics.pair_distances(x, z).mean(), rtol=1e-6
        )
        if method == "none":
            assert stats["reduction"] == 0
            np.testing.assert_array_equal(arrays["z"], z)
        else:
            assert stats["reduction"] > 0
            assert stats["distance_after"] < stats["distance_before"]


def test_same_seed_same_pairing():
    x, z = _digit_batch(24, seed=12)
    batch = {"x": x, "z": z}
    for method in assignment.METHODS:
        a = make_batch_fn(Options(method, seed=4))(batch, 10)[0]["z"]
        b = make_batch_fn(Options(method, seed=4))(batch, 10)[0]["z"]  # A resumed run.
        np.testing.assert_array_equal(a, b)
    knn = make_batch_fn(Options("knn", seed=4))
    assert not np.array_equal(knn(batch, 10)[0]["z"], knn(batch, 11)[0]["z"])
    assert not np.array_equal(
        knn(batch, 10)[0]["z"], make_batch_fn(Options("knn", seed=5))(batch, 10)[0]["z"]
    )


def test_device_scope_pairs_within_shards():
    shards, n = 4, 16
    x, z = _digit_batch(shards * n, seed=13)
    out = make_batch_fn(Options("linear", "device", shards))({"x": x, "z": z}, 0)[0]["z"]
    perm = _rows_of(out, z)
    _assert_permutation(perm, shards * n)
    np.testing.assert_array_equal(perm // n, np.arange(shards * n) // n)
    for solver in _linear.available_solvers():  # Batched solvers too: one problem a shard.
        perm = assignment.permutation(x, z, "linear", shards=shards, solver=solver)
        np.testing.assert_array_equal(perm // n, np.arange(shards * n) // n)
        for s in range(shards):
            part = slice(s * n, (s + 1) * n)
            _assert_optimal(_cost.cost_matrix(x[part], z[part]), perm[part] - s * n)
    arrays, _ = make_batch_fn(Options("linear", "host", shards))({"x": x, "z": z}, 0)
    host = _rows_of(arrays["z"], z)
    assert (host // n != np.arange(shards * n) // n).any()  # Host scope crosses shards.
    np.testing.assert_array_equal(host, assignment.permutation(x, z, "linear"))


def test_assigned_noise_stays_standard_normal():
    # Pooled over a fixed-seed run, a permutation keeps the noise's marginals.
    rng = np.random.default_rng(0)
    fn = make_batch_fn(Options("linear", "device", 2, dtype="float16"))
    pooled = []
    for step in range(40):
        x, _ = _digit_batch(64, seed=100 + step)
        z = rng.standard_normal(x.shape).astype(np.float32)
        pooled.append(fn({"x": x, "z": z}, step)[0]["z"].reshape(64, -1))
    pooled = np.concatenate(pooled)  # [2560, 64]
    n = len(pooled)
    assert np.abs(pooled.mean(axis=0)).max() < 5 / np.sqrt(n)
    assert np.abs(pooled.var(axis=0) - 1).max() < 5 * np.sqrt(2 / n)


# Bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, z: assignment.assign(x, z[:5], "linear"), "batch sizes differ"),
        (lambda x, z: assignment.assign(x, z[..., :2], "linear"), "shapes differ"),
        (lambda x, z: assignment.assign(x[0, 0, 0, 0], z, "none"), "batch axis"),
        (lambda x, z: assignment.assign(np.where(x > 0, np.nan, x), z, "linear"), "NaN or inf"),
        (lambda x, z: assignment.assign(x, z * np.inf, "knn", k=1), "z holds .* NaN or inf"),
        (lambda x, z: assignment.assign(x, z, "hungarian"), "unknown assignment method"),
        (lambda x, z: assignment.permutation(x, z, "knn"), "does not permute"),
        (lambda x, z: assignment.assign(x, z, "linear", costs="l2"), r"unknown option.*'costs'"),
        (lambda x, z: assignment.assign(x, z, "none", k=4), r"unknown option.*'k'"),
        (lambda x, z: assignment.assign(x, z, "linear", cost="l1"), "unknown cost 'l1'"),
        (lambda x, z: assignment.assign(x, z, "linear", dtype="int8"), "unknown distance dtype"),
        (lambda x, z: assignment.assign(x, z, "linear", scale=0.0), "scale"),
        (lambda x, z: assignment.assign(x, z, "linear", scale=float("nan")), "scale"),
        (lambda x, z: assignment.assign(x, z, "linear", solver="munkres"), "unknown solver"),
        (lambda x, z: assignment.assign(x, z, "knn", k=0), "k must be"),
        (lambda x, z: assignment.assign(x, z, "knn", k=4), "needs rng"),
        (lambda x, z: assignment.assign(x.astype(str), z, "none"), "real numbers"),
        (lambda x, z: make_batch_fn(Options("linear", "galaxy")), "unknown assignment scope"),
        (lambda x, z: make_batch_fn(Options("linear", "device", 0)), "num_shards"),
        (lambda x, z: make_batch_fn(Options("none", solver="nope")), "unknown solver"),
        (
            lambda x, z: make_batch_fn(Options("linear", "device", 3))({"x": x, "z": z}, 0),
            "3 equal shards",
        ),
        (lambda x, z: make_batch_fn(Options("linear"))({"x": x}, 0), "no 'z' key"),
        (lambda x, z: _linear.solve(np.zeros((2, 3))), "square"),
        (lambda x, z: assignment.permutation(x, z, "linear", shards=3), "3 equal shards"),
        (lambda x, z: assignment.permutation(x, z, "none", shards=0), "shards must be"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    x, z = _pair(8)
    with pytest.raises(ValueError, match=match):
        call(x, z)


def test_registries():
    assert {"none", "linear", "knn"} <= set(assignment.METHODS)
    assert set(_methods.PERMUTATIONS) == {"none", "linear"}
    assert set(assignment.DEVICE_METHODS) == set(assignment.METHODS)
    assert "scipy" in _linear.available_solvers()


@pytest.mark.parametrize(
    "module",
    ["assignment._cost", "assignment._device", "assignment._diagnostics", "assignment._knn",
     "assignment._linear", "assignment._methods", "cm.pairing", "cm.data.prefetch"],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_knn_draws_differ_between_hosts():
    """In a multi-host run every host pairs its own batch with `process_index` set: its
    knn candidates must be fresh draws of its own, not a copy of host 0's (the same
    candidates on every host would correlate the noise across the global batch)."""
    x, z = _digit_batch(24, seed=14)
    batch = {"x": x, "z": z}
    on = {p: make_batch_fn(Options("knn", seed=4, process_index=p))(batch, 10)[0]["z"]
          for p in (0, 1)}
    assert not np.array_equal(on[0], on[1])
    a, b = (pairing.knn_rng(4, 10, p).standard_normal(64) for p in (0, 1))
    assert not np.array_equal(a, b)
    # ...and stays a function of (seed, step, process_index): a resumed host replays it.
    again = make_batch_fn(Options("knn", seed=4, process_index=1))(batch, 10)[0]["z"]
    np.testing.assert_array_equal(again, on[1])
