"""Samplers against an independent float64 NumPy reference of the papers' algorithms.

- Multistep consistency sampling (Song et al. 2023, Algorithm 1): x = f(t_0 z_0, t_0);
  then for each later time t_i: x <- f(x + sqrt(t_i^2 - sigma_min^2) z_i, t_i); images
  clipped to [-1, 1].
- EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 without churn) on the
  times t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
  t_N = 0: Heun steps, the last one (to t_N = 0) an Euler step; or Euler throughout.

The network is a closed-form stand-in written once in jnp (what the project calls) and
once in NumPy (the reference); the Gaussian draws are taken from JAX with the keys the
samplers use (one key per time from `jax.random.split` for the consistency sampler, the
key itself for the ODE samplers), so the two sides see the same noise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm.objectives import SampleOptions, consistency, edm
from cm.runtime.views import CMConfig

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
SHAPE = (6, 4, 4, 1)
A, B, C = 0.6, 0.1, 0.9  # F(x_in, t_cond) = A x_in + B t_cond + C tanh(x_in)


def net_jnp(params, x_in, t_cond, labels, train, dropout_key):
    del params, labels, train, dropout_key
    return A * x_in + B * t_cond[:, None, None, None] + C * jnp.tanh(x_in)


def net_np(x_in, t_cond):
    return A * x_in + B * t_cond + C * np.tanh(x_in)


def cm_f(x, t):
    """Consistency function with the sigma_min offsets (REFERENCE.md), scalar t."""
    c_skip = SIGMA_DATA**2 / ((t - SIGMA_MIN) ** 2 + SIGMA_DATA**2)
    c_out = (t - SIGMA_MIN) * SIGMA_DATA / math.sqrt(t**2 + SIGMA_DATA**2)
    c_in = 1 / math.sqrt(t**2 + SIGMA_DATA**2)
    return c_skip * x + c_out * net_np(c_in * x, 0.25 * math.log(t))


# EDM's stand-in: the exact denoiser of data N(0, S^2), s^2 / (s^2 + sigma^2) x, written as
# F, plus a non-linear and a time term, so that a wrong step cannot hide behind linearity.
S, B_EDM, C_EDM = 0.4, 0.05, 0.2
EDM_SIGMA_MAX = 2.0  # short trajectories: few steps stay accurate, few values are clipped


def edm_net_jnp(params, x_in, t_cond, labels, train, dropout_key):
    del params, labels, train, dropout_key
    sigma = jnp.exp(4.0 * t_cond)[:, None, None, None]
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / jnp.sqrt(sigma**2 + SIGMA_DATA**2)
    x = x_in * jnp.sqrt(sigma**2 + SIGMA_DATA**2)
    exact = (S**2 / (S**2 + sigma**2) - c_skip) / c_out * x
    return exact + B_EDM * t_cond[:, None, None, None] + C_EDM * jnp.tanh(x_in)


def edm_d(x, sigma):
    """EDM denoiser (Karras et al. 2022, Table 1) around the stand-in F, scalar sigma."""
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2)
    c_in = 1 / math.sqrt(sigma**2 + SIGMA_DATA**2)
    x_in, t_cond = c_in * x, math.log(sigma) / 4
    f = (S**2 / (S**2 + sigma**2) - c_skip) / c_out * x + B_EDM * t_cond + C_EDM * np.tanh(x_in)
    return c_skip * x + c_out * f


def edm_times(n, sigma_max=SIGMA_MAX):
    lo, hi = SIGMA_MIN ** (1 / RHO), sigma_max ** (1 / RHO)
    return [(hi + i / (n - 1) * (lo - hi)) ** RHO for i in range(n)] + [0.0]


def cfg_of(loss, sigma_max=SIGMA_MAX):
    return CMConfig(loss=loss, sigma_min=SIGMA_MIN, sigma_max=sigma_max, rho=RHO,
                                sigma_data=SIGMA_DATA)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("ts", [(80.0,), (80.0, 0.821), (80.0, 2.0, 0.005)])
def test_multistep_consistency_sampling_matches_algorithm_1(ts, clip):
    """Algorithm 1, and with `clip` the OpenAI sampler's clip of each step's x0 to [-1, 1]
    before it is noised again (`clip_denoised=True`); one step is the same either way."""
    key = jax.random.PRNGKey(7)
    got = np.asarray(consistency.sample(net_jnp, None, cfg_of("ct"), key, SHAPE, ts,
                                        clip_denoised=clip), np.float64)
    keys = jax.random.split(key, len(ts))
    z = [np.asarray(jax.random.normal(k, SHAPE), np.float64) for k in keys]
    x = cm_f(ts[0] * z[0], ts[0])
    for t, zi in zip(ts[1:], z[1:], strict=True):
        assert 0.01 < np.mean(np.abs(x) > 1.0) < 0.5, "the intermediate clip must matter"
        x = np.clip(x, -1.0, 1.0) if clip else x
        x = cm_f(x + math.sqrt(t**2 - SIGMA_MIN**2) * zi, t)
    want = x  # the last x0 as it is: make_sampler clips images, never latents
    assert 0.01 < np.mean(np.abs(x) > 1.0) < 0.5, "a final clip must show"
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    spec = consistency.SAMPLING.named(cfg_of("ct"), "2step", SampleOptions())
    assert spec.clip_denoised is True and spec.tag == "2step"  # the default
    assert consistency.SAMPLING.named(cfg_of("ct"), "1step", SampleOptions()).clip_denoised \
        is None


@pytest.mark.parametrize("solver, steps", [("heun", 2), ("heun", 3), ("heun", 6), ("euler", 6)])
def test_ode_samplers_match_edm_algorithm_1(solver, steps):
    cfg = cfg_of("edm", EDM_SIGMA_MAX)
    ts = edm_times(steps, EDM_SIGMA_MAX)
    spec = edm.SAMPLING.named(cfg, f"{solver}{steps}", SampleOptions())
    np.testing.assert_allclose(spec.times, ts, rtol=1e-12)
    assert spec.nfe == (2 * steps - 1 if solver == "heun" else steps)
    key = jax.random.PRNGKey(3)
    sample_fn = spec.sample
    got = np.asarray(sample_fn(edm_net_jnp, None, cfg, key, (64, 4, 4, 1), None), np.float64)

    x = ts[0] * np.asarray(jax.random.normal(key, (64, 4, 4, 1)), np.float64)
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        d = (x - edm_d(x, t)) / t
        x_next = x + (t_next - t) * d
        if solver == "heun" and t_next > 0:
            d_next = (x_next - edm_d(x_next, t_next)) / t_next
            x_next = x + (t_next - t) * (d + d_next) / 2
        x = x_next
    want = x  # the end point as it is: make_sampler clips images, never latents
    if solver == "heun":
        assert np.mean(np.abs(x) > 1.0) > 0.01, "a final clip must show"
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)  # float32 vs float64


def test_recorded_ode_times_follow_karras_rho():
    """The times an eval row records for an EDM sampler are the Karras times with rho
    (the sampler test above uses few steps, where rho matters less visibly)."""
    cfg = cfg_of("edm")
    for solver, steps in (("heun", 18), ("euler", 50)):
        spec = edm.SAMPLING.named(cfg, f"{solver}{steps}", SampleOptions())
        np.testing.assert_allclose(spec.times, edm_times(steps),
                                   rtol=1e-12)


@pytest.mark.parametrize("ts", [(80.0, 80.0), (0.821, 80.0), (80.0, 0.5, 0.5)])
def test_consistency_sampling_refuses_times_not_strictly_descending(ts):
    with pytest.raises(ValueError, match="strictly descending"):
        consistency.sample(net_jnp, None, cfg_of("ct"), jax.random.PRNGKey(0), SHAPE, ts)
