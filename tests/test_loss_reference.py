"""Golden values: the CT, iCT, EDM and CD losses against an independent NumPy reference.

The reference below is written in float64 from the papers' formulas (Song et al. 2023,
arXiv 2303.01469; Song & Dhariwal 2023, arXiv 2310.14189; Karras et al. 2022, Table 1),
not from the project's code. Only the network is a stand-in: a closed-form F written
once in jnp (what the project's losses call) and once in NumPy (the reference). The
random draws (level index n, EDM's standard normal) are the only thing taken from JAX,
with the losses' own per-example keys; the level index is also recovered from the times
the project actually used and checked against the reference's own Karras grid. The
discrete-lognormal probabilities themselves are checked in test_schedules.py. The last
test checks the CIFAR-10 CD config's target EMA against the paper.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm import objectives
from cm.objectives import cd, edm
from cm.runtime.views import CMConfig

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
B, H, W, C = 6, 4, 4, 3
RTOL = 1e-5

# The stand-in network F(x_in, t_cond) = a x_in + b t_cond + c tanh(x_in), per channel.
ONLINE = {"a": [0.9, 1.1, 0.7], "b": [0.3, -0.2, 0.15], "c": [0.5, -0.4, 0.2]}
TARGET = {"a": [0.85, 1.2, 0.6], "b": [0.25, -0.1, 0.2], "c": [0.45, -0.3, 0.35]}
TEACHER = {"a": [0.2, -0.1, 0.3], "b": [0.05, 0.1, -0.08], "c": [0.6, 0.9, 0.4]}


def jnp_params(p):
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def np_params(p):
    # The float32 values the project sees, widened, so that only the computation differs.
    return {k: np.asarray(np.asarray(v, np.float32), np.float64) for k, v in p.items()}


def net_jnp(params, x_in, t_cond, labels, train, dropout_key):
    del labels, train, dropout_key
    t = t_cond[:, None, None, None]
    return params["a"] * x_in + params["b"] * t + params["c"] * jnp.tanh(x_in)


def net_np(params, x_in, t_cond):
    t = t_cond[:, None, None, None]
    return params["a"] * x_in + params["b"] * t + params["c"] * np.tanh(x_in)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (B, H, W, C)).astype(np.float32)
    z = rng.standard_normal((B, H, W, C)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), B)
    return x, z, keys


# ---------------------------------------------------------------------------------------
# Reference, NumPy float64, from the papers.


def karras_grid(n):
    """t_i = (sigma_min^(1/rho) + i/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho."""
    i = np.arange(n, dtype=np.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (lo + i / (n - 1) * (hi - lo)) ** RHO


def ct_n(k, K, s0, s1):
    """CT adaptive N(k) (Song et al. 2023, Appendix C)."""
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_mu(k, K, s0, s1, mu0):
    return math.exp(s0 * math.log(mu0) / ct_n(k, K, s0, s1))


def ict_n(k, K, s0, s1):
    """iCT exponential curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1."""
    k_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / k_prime), s1) + 1


def cm_f(params, x, t):
    """f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, 0.25 ln t), with the sigma_min offset."""
    c_skip = SIGMA_DATA**2 / ((t - SIGMA_MIN) ** 2 + SIGMA_DATA**2)
    c_out = (t - SIGMA_MIN) * SIGMA_DATA / np.sqrt(t**2 + SIGMA_DATA**2)
    c_in = 1 / np.sqrt(t**2 + SIGMA_DATA**2)
    b = lambda v: v[:, None, None, None]
    return b(c_skip) * x + b(c_out) * net_np(params, b(c_in) * x, 0.25 * np.log(t))


def edm_d(params, x, sigma):
    """EDM denoiser, Karras et al. 2022 Table 1: c_noise = ln(sigma) / 4."""
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / np.sqrt(sigma**2 + SIGMA_DATA**2)
    c_in = 1 / np.sqrt(sigma**2 + SIGMA_DATA**2)
    b = lambda v: v[:, None, None, None]
    return b(c_skip) * x + b(c_out) * net_np(params, b(c_in) * x, np.log(sigma) / 4)


def heun(params, x, t_from, t_to):
    """One Heun step of dx/dt = (x - D(x, t)) / t from t_from to t_to (EDM Algorithm 1)."""
    b = lambda v: v[:, None, None, None]
    slope = lambda y, t: (y - edm_d(params, y, t)) / b(t)
    d0 = slope(x, t_from)
    x_euler = x + b(t_to - t_from) * d0
    return x + b(t_to - t_from) * (d0 + slope(x_euler, t_to)) / 2


def metric(a, b, name):
    """d(a, b) per example. The papers' l2 is ||a - b||^2; the project's documented
    convention (the OpenAI code's mean_flat) divides it by the dimension, a constant."""
    diff = (a - b).reshape(a.shape[0], -1)
    dim = diff.shape[1]
    sq = np.sum(diff**2, axis=1)
    if name == "l2":
        return sq / dim
    if name == "pseudo_huber":  # iCT: sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim)
        c = 0.00054 * math.sqrt(dim)
        return np.sqrt(sq + c * c) - c
    raise ValueError(name)


def recover_levels(cfg, step, keys, n_levels):
    """(n, t_n, t_{n+1}) from the times the project draws, matched to our own grid."""
    t_lo, t_hi, _ = getattr(objectives, cfg.loss).levels(cfg, jnp.int32(step), keys)
    t_lo, t_hi = np.asarray(t_lo, np.float64), np.asarray(t_hi, np.float64)
    grid = karras_grid(n_levels)
    n = np.argmin(np.abs(np.log(t_lo)[:, None] - np.log(grid)[None, :]), axis=1)
    assert np.all((n >= 0) & (n <= n_levels - 2)), f"level index out of 0..N-2: {n}"
    np.testing.assert_allclose(t_lo, grid[n], rtol=RTOL, err_msg="t_n is not on the grid")
    np.testing.assert_allclose(t_hi, grid[n + 1], rtol=RTOL,
                               err_msg="t_{n+1} is not the next level after t_n")
    return n, grid[n], grid[n + 1]


def uniform_draw(keys, n_levels):
    """n uniform in 0..N-2, the same draw as the loss makes from the same key."""
    return np.array([int(jax.random.randint(k, (), 0, n_levels - 1)) for k in keys])


def lognormal_draw(keys, n_levels, p_mean, p_std, pad_to):
    """iCT's discrete lognormal n from our own erf probabilities, same key, same padding."""
    t = karras_grid(n_levels)
    cdf = np.array([math.erf((math.log(v) - p_mean) / (math.sqrt(2) * p_std)) for v in t])
    p = np.diff(cdf)
    logits = np.full(pad_to, -np.inf, np.float32)
    logits[: n_levels - 1] = np.log(p / p.sum())
    return np.array([int(jax.random.categorical(k, jnp.asarray(logits))) for k in keys])


# ---------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("step", [0, 370, 1000])
@pytest.mark.parametrize("metric_name", ["l2", "pseudo_huber"])
def test_ct_loss_matches_reference(step, metric_name):
    K, s0, s1 = 1000, 2, 150
    cfg = CMConfig(loss="ct", metric=metric_name, start_scales=s0, end_scales=s1,
                               start_ema=0.9, total_steps=K, sigma_min=SIGMA_MIN,
                               sigma_max=SIGMA_MAX, rho=RHO, sigma_data=SIGMA_DATA)
    x, z, keys = inputs(1)
    loss, aux = objectives.get(cfg.loss).loss(net_jnp, cfg, jnp_params(ONLINE),
                                             jnp_params(TARGET), jnp.asarray(x), jnp.asarray(z),
                                             jnp.int32(step), keys, jax.random.PRNGKey(9))

    n_levels = ct_n(step, K, s0, s1)
    n_scales = objectives.get(cfg.loss).num_scales(cfg, jnp.int32(step))
    assert int(n_scales) == n_levels, "CT curriculum N(k)"
    n, t_lo, t_hi = recover_levels(cfg, step, keys, n_levels)
    np.testing.assert_array_equal(n, uniform_draw(keys, n_levels),
                                  err_msg="n is not uniform in 0..N(k)-2 with the example key")
    x64, z64 = x.astype(np.float64), z.astype(np.float64)
    b = lambda v: v[:, None, None, None]
    online = cm_f(np_params(ONLINE), x64 + b(t_hi) * z64, t_hi)
    target = cm_f(np_params(TARGET), x64 + b(t_lo) * z64, t_lo)  # the EMA target's params
    d = metric(online, target, metric_name)
    np.testing.assert_allclose(float(loss), np.mean(d), rtol=RTOL, err_msg="CT loss")
    np.testing.assert_allclose(float(aux["distance"]), np.mean(d), rtol=RTOL)
    # The target the loss is given is the EMA with mu(k) = exp(s0 ln mu0 / N(k)).
    assert float(objectives.get(cfg.loss).target_decay(cfg, jnp.int32(step))) == pytest.approx(
        ct_mu(step, K, s0, s1, 0.9), rel=1e-6)


@pytest.mark.parametrize("step", [0, 150, 300])
def test_ict_loss_matches_reference(step):
    K, s0, s1, p_mean, p_std = 400, 10, 40, -1.1, 2.0
    cfg = CMConfig(loss="ict", metric="pseudo_huber", start_scales=s0,
                               end_scales=s1, total_steps=K, p_mean=p_mean, p_std=p_std,
                               sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO,
                               sigma_data=SIGMA_DATA)
    x, z, keys = inputs(2)
    # target_params is deliberately wrong: iCT's target is the online network (mu = 0).
    loss, aux = objectives.get(cfg.loss).loss(net_jnp, cfg, jnp_params(ONLINE),
                                             jnp_params(TEACHER), jnp.asarray(x),
                                             jnp.asarray(z), jnp.int32(step), keys,
                                             jax.random.PRNGKey(9))

    n_levels = ict_n(step, K, s0, s1)
    n_scales = objectives.get(cfg.loss).num_scales(cfg, jnp.int32(step))
    assert int(n_scales) == n_levels, "iCT curriculum N(k)"
    n, t_lo, t_hi = recover_levels(cfg, step, keys, n_levels)
    np.testing.assert_array_equal(
        n, lognormal_draw(keys, n_levels, p_mean, p_std, pad_to=s1),
        err_msg="n is not the discrete-lognormal draw (erf probabilities) of the example key")
    x64, z64 = x.astype(np.float64), z.astype(np.float64)
    b = lambda v: v[:, None, None, None]
    online = cm_f(np_params(ONLINE), x64 + b(t_hi) * z64, t_hi)
    target = cm_f(np_params(ONLINE), x64 + b(t_lo) * z64, t_lo)
    d = metric(online, target, "pseudo_huber")
    weight = 1 / (t_hi - t_lo)  # lambda(t_n) = 1 / (t_{n+1} - t_n)
    np.testing.assert_allclose(float(loss), np.mean(weight * d), rtol=RTOL, err_msg="iCT loss")
    np.testing.assert_allclose(float(aux["distance"]), np.mean(d), rtol=RTOL)
    assert float(objectives.get(cfg.loss).target_decay(cfg, jnp.int32(step))) == 0.0


def test_edm_loss_matches_reference():
    p_mean, p_std = -1.2, 1.2  # EDM's training sigma distribution
    cfg = CMConfig(loss="edm", p_mean=p_mean, p_std=p_std, sigma_min=SIGMA_MIN,
                               sigma_max=SIGMA_MAX, rho=RHO, sigma_data=SIGMA_DATA)
    x, z, keys = inputs(3)
    loss, aux = edm.edm_loss(net_jnp, cfg, jnp_params(ONLINE), None, jnp.asarray(x),
                             jnp.asarray(z), jnp.int32(0), keys, jax.random.PRNGKey(9))

    normal = np.array([float(jax.random.normal(k, ())) for k in keys])  # the random draw
    sigma = np.exp(p_mean + p_std * normal)  # ln sigma ~ N(P_mean, P_std^2)
    x64, z64 = x.astype(np.float64), z.astype(np.float64)
    denoised = edm_d(np_params(ONLINE), x64 + sigma[:, None, None, None] * z64, sigma)
    err = np.sum(((denoised - x64) ** 2).reshape(B, -1), axis=1) / (H * W * C)  # per pixel
    lam = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    np.testing.assert_allclose(float(loss), np.mean(lam * err), rtol=RTOL, err_msg="EDM loss")
    np.testing.assert_allclose(float(aux["distance"]), np.mean(err), rtol=RTOL)


@pytest.mark.parametrize("metric_name", ["l2", "pseudo_huber"])
def test_cd_loss_matches_reference(metric_name):
    n_levels = 18
    cfg = CMConfig(loss="cd", metric=metric_name, start_scales=n_levels,
                               end_scales=n_levels, start_ema=0.95, total_steps=1000,
                               sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO,
                               sigma_data=SIGMA_DATA)
    x, z, keys = inputs(4)
    loss, aux = cd.cd_loss(net_jnp, cfg, jnp_params(ONLINE), jnp_params(TARGET),
                                jnp.asarray(x), jnp.asarray(z), jnp.int32(123), keys,
                                jax.random.PRNGKey(9), teacher_params=jnp_params(TEACHER),
                                teacher_apply_fn=net_jnp)

    n_scales = objectives.get(cfg.loss).num_scales(cfg, jnp.int32(123))
    assert int(n_scales) == n_levels, "CD uses a fixed N"
    n, t_lo, t_hi = recover_levels(cfg, 123, keys, n_levels)
    np.testing.assert_array_equal(n, uniform_draw(keys, n_levels))
    x64, z64 = x.astype(np.float64), z.astype(np.float64)
    x_hi = x64 + t_hi[:, None, None, None] * z64
    x_lo = heun(np_params(TEACHER), x_hi, t_hi, t_lo)
    online = cm_f(np_params(ONLINE), x_hi, t_hi)
    target = cm_f(np_params(TARGET), x_lo, t_lo)
    d = metric(online, target, metric_name)
    np.testing.assert_allclose(float(loss), np.mean(d), rtol=RTOL, err_msg="CD loss")
    np.testing.assert_allclose(float(aux["distance"]), np.mean(d), rtol=RTOL)


def test_cifar10_cd_target_is_the_online_network():
    """CIFAR-10 CD (Song et al. 2023, Table 3; the OpenAI JAX config cifar10_ve_cd.py has no
    target network): mu = 0, the target is stop_gradient(theta); 0.95 is ImageNet-64/LSUN."""
    from configs import cifar10_cd

    cfg = CMConfig.from_config(cifar10_cd.get_config())
    assert cfg.loss == "cd" and int(objectives.get(cfg.loss).num_scales(cfg, jnp.int32(0))) == 18
    mu = float(objectives.get(cfg.loss).target_decay(cfg, jnp.int32(0)))
    assert mu == 0.0, (
        f"configs/cifar10_cd.py sets cm.start_ema = {mu:g}, the CD target EMA mu; the CM paper "
        "and REFERENCE.md give mu = 0 for CIFAR-10 CD (0.95 is the ImageNet-64/LSUN setting)")
