"""Flow matching (cm/objectives/fm.py): the loss against the formula in NumPy, the samplers
on Gaussian data with the exact velocity field, dopri5's network calls, the couplings.

Gaussian data x ~ N(0, s^2 I) with independent noise z ~ N(0, I): x_t = (1 - t) x + t z is
N(0, sigma_t^2 I) with sigma_t^2 = (1 - t)^2 s^2 + t^2, and the exact marginal velocity is
E[z - x | x_t] = (t - (1 - t) s^2) / sigma_t^2 * x_t. Integrated from t = 1 to 0 it maps
N(0, I) onto N(0, s^2 I) exactly; each sampler must land there up to its own
discretisation error, which a NumPy recursion written here from the method's definition
reproduces sample by sample.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm import config as config_lib
from cm import objectives, train
from cm.objectives import SampleOptions, fm
from cm.pairing import Options, make_batch_fn
from cm.runtime.views import CMConfig, ConfigError
from tests.helpers import tiny_config

S = 0.5  # the data's standard deviation
SHAPE = (256, 4, 4, 1)
T_SCALE = 1000.0


def exact_velocity(y, t):
    sig2 = (1 - t) ** 2 * S**2 + t**2
    return (t - (1 - t) * S**2) / sig2 * y


def net(params, x_in, t_cond, labels, train_, key):
    """The exact field as a 'network' (its time input is t * fm_t_scale)."""
    del params, labels, train_, key
    t = (t_cond / T_SCALE)[:, None, None, None]
    return exact_velocity(x_in, t)


CFG = CMConfig(loss="fm", fm_t_scale=T_SCALE)


def numpy_fixed(y, steps, method):
    ts = np.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        dt = t_next - t
        d = exact_velocity(y, t)
        if method == "euler":
            y = y + dt * d
        else:
            y = y + dt * 0.5 * (d + exact_velocity(y + dt * d, t_next))
    return y


def draw(name, key=jax.random.PRNGKey(0)):
    spec = fm.SAMPLING.named(CFG, name, SampleOptions())
    out = spec.sample(net, None, CFG, key, SHAPE, None)
    images, nfe = out if spec.nfe is None else (out, spec.nfe)
    return spec, np.asarray(images, np.float64), nfe


@pytest.mark.parametrize("name, method, steps, calls", [
    ("euler50", "euler", 50, 50), ("heun10", "heun", 10, 20), ("euler5", "euler", 5, 5)])
def test_fixed_step_samplers_follow_their_method_and_land_on_the_target(name, method, steps,
                                                                        calls):
    spec, got, nfe = draw(name)
    assert nfe == calls and spec.times == tuple(np.linspace(1, 0, steps + 1))
    y1 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), SHAPE), np.float64)
    want = numpy_fixed(y1, steps, method)  # not clipped: make_sampler clips images
    np.testing.assert_allclose(got, want, atol=2e-5)  # the same recursion, float32
    # Exact flow: the variance is s^2; Euler's 50-step error is a few 1e-3.
    unclipped = numpy_fixed(y1, 400, "heun")
    assert np.var(unclipped) / np.var(y1) == pytest.approx(S**2, rel=1e-4)
    # Euler's error is first order: 0.011 at 50 steps (measured), 0.1 at 5; Heun's second.
    tol = {"euler5": 0.15, "euler50": 0.02, "heun10": 0.005}[name]
    assert np.var(unclipped) == pytest.approx(np.var(got), abs=tol)


def test_a_broken_step_fails_the_comparison():
    """The check above on a sampler with its time grid reversed in the update (a step of
    +dt): it must not pass."""
    y1 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), SHAPE), np.float64)
    broken = y1.copy()
    ts = np.linspace(1.0, 0.0, 51)
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        broken = broken - (t_next - t) * exact_velocity(broken, t)  # wrong sign
    _, got, _ = draw("euler50")
    assert np.abs(broken - got).max() > 0.1
    assert abs(np.var(broken) - np.var(got)) > 0.05


def test_dopri5_lands_on_the_target_and_counts_its_network_calls():
    calls = [0]

    def counting_net(*args):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return net(*args)

    spec = fm.SAMPLING.named(CFG, "dopri5", SampleOptions())
    assert spec.nfe is None and spec.name == "dopri5"
    images, nfe = spec.sample(counting_net, None, CFG, jax.random.PRNGKey(0), SHAPE, None)
    jax.block_until_ready(images)
    assert int(nfe) == calls[0] > 6  # 6 per attempted step and one more, counted here
    y1 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), SHAPE), np.float64)
    exact = y1 * S  # the exact flow's end: y_0 = y_1 sigma_0 / sigma_1
    np.testing.assert_allclose(np.asarray(images, np.float64), exact, atol=1e-4)
    loose = fm.SAMPLING.named(CFG, "dopri5_1e-2", SampleOptions())
    _, fewer = loose.sample(net, None, CFG, jax.random.PRNGKey(0), SHAPE, None)
    assert int(fewer) < int(nfe)
    with pytest.raises(ConfigError, match="not a sampler"):
        fm.SAMPLING.named(CFG, "dopri4", SampleOptions())


@pytest.mark.parametrize("time", ["uniform", "logit_normal"])
def test_loss_matches_the_formula_in_numpy(time):
    """mean_i mean_pixels (v(x_t, t) - (z - x))^2 with x_t = (1 - t) x + t z, t from the
    example's key (uniform, or sigmoid(m + s n)), for a linear 'network' whose output
    depends on x_t and t."""
    cfg = CMConfig(loss="fm", fm_time=time, fm_logit_mean=0.3, fm_logit_std=0.8,
                   fm_t_scale=T_SCALE)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (6, 3, 3, 2)).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.normal(size=(2, 2)).astype(np.float32)

    def linear_net(params, x_in, t_cond, labels, train_, key):
        return x_in @ params + 0.001 * t_cond[:, None, None, None]

    keys = jax.random.split(jax.random.PRNGKey(4), 6)
    loss, aux = fm.fm_loss(linear_net, cfg, jnp.asarray(w), None, jnp.asarray(x),
                           jnp.asarray(z), jnp.int32(0), keys, None)
    if time == "uniform":
        t = np.array([float(jax.random.uniform(k, ())) for k in keys])
    else:
        n = np.array([float(jax.random.normal(k, ())) for k in keys])
        t = 1 / (1 + np.exp(-(0.3 + 0.8 * n)))
    tb = t[:, None, None, None].astype(np.float64)
    x_t = (1 - tb) * x + tb * z
    v = x_t @ w.astype(np.float64) + 0.001 * T_SCALE * tb
    want = np.mean(np.mean(((v - (z - x)) ** 2).reshape(6, -1), axis=1))
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(aux["distance"]) == pytest.approx(want, rel=1e-5)
    assert 0 < t.min() and t.max() < 1


def test_fm_trains_and_evaluates_with_both_samplers(tmp_path):
    config = tiny_config(**{"cm.loss": "fm", "training.n_iters": 2,
                            "training.snapshot_every": 2, "optim.warmup": 0,
                            "eval.samplers": ("euler3", "dopri5_1e-2"), "eval.n_samples": 16,
                            "eval.batch_size": 8, "eval.stats_path": str(tmp_path / "ref.npz"),
                            "assignment.method": "linear", "assignment.cost": "sqeuclidean"})
    cfg = config_lib.build(config)
    assert (cfg.sample.solver, cfg.sample.steps) == ("heun", 4)  # heun is an fm sampler too
    last = train.train(config, str(tmp_path / "run"))
    assert last["step"] == 2 and np.isfinite(last["loss"])
    from evaluation import run as eval_run

    rows = eval_run.evaluate(None, str(tmp_path / "run"))
    assert [r["sampler"] for r in rows] == ["euler3", "dopri5_1e-2"]
    assert rows[0]["nfe"] == 3 and rows[0]["ts"] == list(np.linspace(1.0, 0.0, 4))
    assert rows[1]["nfe"] >= 7 and rows[1]["ts"] == [1.0, 0.0]  # counted, per round
    assert all(np.isfinite(r["fd_pixels"]) for r in rows)


def test_resampling_draws_pairs_of_the_pairing_with_replacement():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (16, 5)).astype(np.float32)
    z = rng.standard_normal((16, 5)).astype(np.float32)
    labels = np.arange(16)
    base = Options("linear", "device", 2, cost="sqeuclidean", seed=1)
    paired, _ = make_batch_fn(base)({"x": x, "z": z, "label": labels}, 7)
    pairs = {(tuple(a), tuple(b)) for a, b in zip(paired["x"], paired["z"], strict=True)}
    out, stats = make_batch_fn(dataclasses.replace(base, resample=True))(
        {"x": x, "z": z, "label": labels}, 7)
    got = list(zip(map(tuple, out["x"]), map(tuple, out["z"]), strict=True))
    assert all(p in pairs for p in got)  # only pairs of the pairing
    np.testing.assert_array_equal(out["x"], x[out["label"]])  # labels follow their images
    assert len(set(out["label"])) < 16  # with replacement: some twice, some not at all
    assert set(out["label"][:8]) <= set(range(8)) and set(out["label"][8:]) <= set(range(8, 16))
    again, _ = make_batch_fn(dataclasses.replace(base, resample=True))(
        {"x": x, "z": z, "label": labels}, 7)
    np.testing.assert_array_equal(again["label"], out["label"])  # a function of (seed, step)
    with pytest.raises(ValueError, match="resample"):
        Options("knn", resample=True)
    with pytest.raises(ConfigError, match="resample"):
        config_lib.build(tiny_config(**{"assignment.method": "knn",
                                        "assignment.resample": True}))
    assert stats["distance_after"] > 0


def test_the_objective_is_one_module_and_one_registry_line():
    assert objectives.get("fm") is fm.OBJECTIVE
    assert not fm.OBJECTIVE.keeps_target and fm.OBJECTIVE.frozen_inputs(CFG) == ()
    with pytest.raises(ConfigError, match="fm_time"):
        config_lib.build(tiny_config(**{"cm.loss": "fm", "cm.fm_time": "beta"}))
