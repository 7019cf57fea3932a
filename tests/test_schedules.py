"""Schedules and parameterisation against the closed forms of REFERENCE.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm import objectives, schedules
from cm.objectives import consistency
from cm.runtime.views import CMConfig


def ct_n(k, K, s0, s1):
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


@pytest.mark.parametrize("k", [0, 1, 1000, 123_457, 400_000, 799_999, 800_000])
def test_ct_num_scales_and_decay(k):
    n = int(schedules.ct_num_scales(k, 800_000, 2, 150))
    assert n == ct_n(k, 800_000, 2, 150)
    mu = float(schedules.ct_ema_decay(n, 2, 0.9))
    assert mu == pytest.approx(math.exp(2 * math.log(0.9) / n), rel=1e-6)


def test_ct_end_points():
    assert int(schedules.ct_num_scales(0, 100, 2, 150)) == 2
    assert int(schedules.ct_num_scales(100, 100, 2, 150)) == 151


@pytest.mark.parametrize("k", [0, 5, 49_999, 50_000, 57_142, 100_000, 399_999])
def test_ict_curriculum(k):
    K, s0, s1 = 400_000, 10, 1280
    k_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    want = min(s0 * 2 ** math.floor(k / k_prime), s1) + 1
    assert int(schedules.ict_num_scales(k, K, s0, s1)) == want


@pytest.mark.parametrize("loss", ["ct", "ict", "edm", "cd"])
def test_each_loss_gets_its_curriculum_and_target_decay(loss):
    """N(k) and the target EMA mu(k) that the train step reads from CMConfig, at a step
    where CT's mu(k) has moved away from mu0, against the closed forms."""
    cfg = CMConfig(loss=loss, total_steps=1000, start_scales=10, end_scales=150,
                               start_ema=0.95)
    k, ct_k = 600, ct_n(600, 1000, 10, 150)
    k_prime = math.floor(1000 / (math.log2(math.floor(150 / 10)) + 1))
    want = {
        "ct": (ct_k, math.exp(10 * math.log(0.95) / ct_k)),
        "ict": (min(10 * 2 ** (k // k_prime), 150) + 1, 0.0),  # target = online
        "edm": (0, 0.0),
        "cd": (150, 0.95),  # fixed N = s1 and mu = mu0
    }[loss]
    objective = objectives.get(cfg.loss)
    got = (int(objective.num_scales(cfg, jnp.int32(k))),
           float(objective.target_decay(cfg, jnp.int32(k))))
    assert got[0] == want[0] and got[1] == pytest.approx(want[1], rel=1e-6), (got, want)


def test_karras_sigmas_ascending_with_end_points():
    s = np.asarray(schedules.karras_sigmas(18, 0.002, 80.0, 7.0))
    assert np.all(np.diff(s) > 0)
    np.testing.assert_allclose([s[0], s[-1]], [0.002, 80.0], rtol=1e-5)
    i = 7
    want = (0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert s[i] == pytest.approx(want, rel=1e-5)
    padded = np.asarray(schedules.karras_sigmas(jnp.int32(18), 0.002, 80.0, 7.0, max_n=30))
    np.testing.assert_allclose(padded[:18], s, rtol=1e-6)
    np.testing.assert_allclose(padded[18:], 80.0, rtol=1e-5)


@pytest.mark.parametrize("n", [11, 161, 1281])
def test_lognormal_probabilities(n):
    sig = schedules.karras_sigmas(n, 0.002, 80.0, 7.0, max_n=1281)
    p = np.asarray(schedules.lognormal_level_probs(sig, n, -1.1, 2.0), np.float64)
    assert p.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(p[: n - 1] > 0) and np.all(p[n - 1:] == 0)
    s = np.asarray(sig, np.float64)[:n]
    erf = np.vectorize(math.erf)
    w = erf((np.log(s[1:]) + 1.1) / (math.sqrt(2) * 2.0)) - erf(
        (np.log(s[:-1]) + 1.1) / (math.sqrt(2) * 2.0))
    np.testing.assert_allclose(p[: n - 1], w / w.sum(), rtol=2e-3, atol=1e-7)


def test_boundary_condition_exact_at_sigma_min():
    cfg = CMConfig()

    def apply_fn(params, x, t, labels, train, key):
        return 1e3 * jnp.ones_like(x) + params

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    out = consistency.consistency_fn(apply_fn, 1.0, x, jnp.full((4,), cfg.sigma_min), cfg)
    assert np.array_equal(np.asarray(out), np.asarray(x))
    c_skip, c_out, c_in = consistency.scalings(jnp.array([1.0]), 0.002, 0.5)
    assert float(c_skip[0]) == pytest.approx(0.25 / (0.998**2 + 0.25), rel=1e-6)
    assert float(c_out[0]) == pytest.approx(0.998 * 0.5 / math.sqrt(1.25), rel=1e-6)
    assert float(c_in[0]) == pytest.approx(1 / math.sqrt(1.25), rel=1e-6)


def test_distance_metrics():
    a = jnp.zeros((2, 4, 4, 3))
    b = jnp.ones((2, 4, 4, 3)) * 0.5
    np.testing.assert_allclose(consistency.distance(a, b, "l2", -1), 0.25)
    np.testing.assert_allclose(consistency.distance(a, b, "l1", -1), 0.5)
    c = 0.00054 * math.sqrt(48)
    np.testing.assert_allclose(consistency.distance(a, b, "pseudo_huber", -1),
                               math.sqrt(48 * 0.25 + c * c) - c, rtol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        CMConfig(metric="lpipz")


@pytest.mark.parametrize("loss", ["ct", "ict"])
def test_no_gradient_reaches_target(loss):
    """The gradient is that of the online branch alone: the target pass is a constant.

    For iCT the target is the online network itself, so a zero gradient with respect to
    `target` says nothing; the gradient with respect to `params` must equal that of the
    loss written by hand with the target's parameters held fixed (and differ from the
    gradient through both passes).
    """
    cfg = CMConfig(loss=loss, total_steps=100, start_scales=10, end_scales=40)

    def apply_fn(p, x, t, labels, train, key):
        assert train, "both passes run in training mode (dropout on, the same key)"
        return p["w"] * x + p["b"]

    params = {"w": jnp.float32(0.3), "b": jnp.float32(0.1)}
    target = {"w": jnp.float32(-0.2), "b": jnp.float32(0.5)}
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 1))
    z = jax.random.normal(jax.random.PRNGKey(2), (6, 4, 4, 1))
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    step = jnp.int32(5)

    def loss_of(p, t):
        return objectives.get(cfg.loss).loss(apply_fn, cfg, p, t, x, z, step, keys,
                                            jax.random.PRNGKey(4))[0]

    g_target = jax.grad(loss_of, argnums=1)(params, target)
    assert all(float(v) == 0.0 for v in jax.tree.leaves(g_target))
    g_params = jax.grad(loss_of)(params, target)

    # By hand: online f(x + t_hi z, t_hi) against the teacher's f(x + t_lo z, t_lo).
    t_lo, t_hi, weight = getattr(objectives, cfg.loss).levels(cfg, step, keys)
    b = lambda t: t[:, None, None, None]

    def by_hand(p_online, p_teacher):
        f = lambda p, t: consistency.consistency_fn(apply_fn, p, x + b(t) * z, t, cfg,
                                                    train=True)
        d = consistency.distance(f(p_online, t_hi), f(p_teacher, t_lo), cfg.metric, -1.0)
        return jnp.mean(weight * d)

    teacher = params if loss == "ict" else target
    assert float(loss_of(params, target)) == pytest.approx(float(by_hand(params, teacher)),
                                                           rel=1e-6)
    want = jax.grad(by_hand)(params, teacher)  # the teacher's parameters held fixed
    for name in params:
        assert float(g_params[name]) == pytest.approx(float(want[name]), rel=1e-5), name
    if loss == "ict":  # the gradient through both passes is another one: the check can see it
        both = jax.grad(lambda p: by_hand(p, p))(params)
        assert max(abs(float(both[k] - want[k])) for k in params) > 1e-2 * max(
            abs(float(want[k])) for k in params)


def test_ict_levels_follow_lognormal():
    cfg = CMConfig(loss="ict", start_scales=10, end_scales=1280, total_steps=10)
    keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
    t_lo, t_hi, w = getattr(objectives, cfg.loss).levels(cfg, jnp.int32(0), keys)
    sig = np.asarray(schedules.karras_sigmas(11, 0.002, 80.0, 7.0))
    n = np.searchsorted(sig, np.asarray(t_lo) * (1 + 1e-6)) - 1
    freq = np.bincount(n, minlength=10)[:10] / len(n)
    p = np.asarray(schedules.lognormal_level_probs(jnp.asarray(sig), 11, -1.1, 2.0))
    np.testing.assert_allclose(freq, p, atol=0.015)
    np.testing.assert_allclose(np.asarray(w), 1 / (np.asarray(t_hi) - np.asarray(t_lo)),
                               rtol=1e-5)


@pytest.mark.parametrize("K, s0, s1", [(400_000, 3, 100), (1000, 7, 20)])
def test_ict_curriculum_floors_the_ratio(K, s0, s1):
    """K' = floor(K / (log2 floor(s1/s0) + 1)) floors s1/s0 inside the log. Every other
    test uses s1/s0 integer (1280/10, 150/10, 40/10), where the inner floor changes
    nothing; here it does, and N(k) is checked on both sides of the first doubling."""
    k_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    assert k_prime != math.floor(K / (math.log2(s1 / s0) + 1))  # the floor matters here
    for k in (0, k_prime - 200, k_prime - 1, k_prime, 2 * k_prime - 1, 2 * k_prime, K):
        want = min(s0 * 2 ** math.floor(k / k_prime), s1) + 1
        assert int(schedules.ict_num_scales(k, K, s0, s1)) == want, k


@pytest.mark.parametrize("c", [0.0, 0.03])
def test_pseudo_huber_with_an_explicit_c(c):
    """cm.huber_c >= 0 is used as given (configs/base.py: only < 0 means the iCT default
    0.00054 sqrt(dim)); c = 0 makes the metric the plain Euclidean norm ||a - b||."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
    b = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
    sq = ((a.astype(np.float64) - b) ** 2).reshape(3, -1).sum(axis=1)
    want = np.sqrt(sq + c * c) - c
    got = np.asarray(consistency.distance(jnp.asarray(a), jnp.asarray(b), "pseudo_huber", c))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if c == 0.0:
        np.testing.assert_allclose(got, np.sqrt(sq), rtol=1e-6)
