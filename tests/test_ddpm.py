"""DDPM: schedule and posterior closed forms, the loss, DDIM and ancestral samplers on
Gaussian data, a tiny run that trains, samples and evaluates, and what the loss sees
under assignment. Reference values are computed here in NumPy (float64) from the
formulas of Ho et al. (2020), Song et al. (2021) and Nichol & Dhariwal (2021)."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm import config as config_lib
from cm import data, nets, objectives, sample_run, train
from cm.objectives import SampleOptions, ddpm, edm
from cm.runtime import workdir
from cm.runtime.views import CMConfig
from tests.helpers import override, tiny_config

T = 1000
CFG = CMConfig(loss="ddpm")  # T = 1000, linear 1e-4 .. 0.02


def linear_alpha_bar(n=T, lo=1e-4, hi=0.02):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), as a running product of Python floats."""
    out, acc = [], 1.0
    for i in range(n):
        acc *= 1.0 - (lo + (hi - lo) * i / (n - 1))
        out.append(acc)
    return np.array(out)


# ----------------------------------------------------------------------------------------
# Closed forms.


def test_alpha_bar_of_the_linear_and_cosine_schedules():
    sched = ddpm.schedule_of(CFG)
    want = linear_alpha_bar()
    np.testing.assert_allclose(sched.alphas_cumprod, want, rtol=1e-12)
    assert sched.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # ~0 at t = T
    np.testing.assert_allclose(sched.alphas_cumprod_prev[1:], want[:-1], rtol=1e-12)
    assert sched.alphas_cumprod_prev[0] == 1.0
    # Cosine: alpha_bar_t = f(t + 1) / f(0), f(u) = cos^2(pi/2 (u/T + s) / (1 + s)),
    # wherever the 0.999 clip of the betas has not acted (it acts only at the very end).
    cos = ddpm.schedule_of(CMConfig(loss="ddpm", beta_schedule="cosine"))
    f = lambda u: math.cos(math.pi / 2 * (u / T + 0.008) / 1.008) ** 2  # noqa: E731
    want = np.array([f(t + 1) / f(0) for t in range(T)])
    clipped = cos.betas >= 0.999
    assert clipped.sum() == 1 and clipped[-1]
    np.testing.assert_allclose(cos.alphas_cumprod[:-1], want[:-1], rtol=1e-9)
    with pytest.raises(ValueError, match="beta_schedule"):
        ddpm.make_betas("quadratic", T)


@pytest.mark.parametrize("t", [0, 1, 17, 500, 999])
def test_posterior_mean_and_variance_from_bayes_rule(t):
    """q(x_{t-1} | x_t, x_0) is the product of q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1},
    beta_t) and q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}): precisions
    add, means are precision-weighted."""
    sched = ddpm.schedule_of(CFG)
    beta = 1e-4 + (0.02 - 1e-4) * t / (T - 1)
    abar_prev = 1.0 if t == 0 else linear_alpha_bar()[t - 1]
    x0, xt = 0.37, -1.21
    if t == 0:  # x_{-1} = x_0 exactly: no variance, the mean is x_0
        want_var, want_mean = 0.0, x0
    else:
        precision = (1 - beta) / beta + 1 / (1 - abar_prev)
        want_var = 1 / precision
        want_mean = want_var * (math.sqrt(1 - beta) * xt / beta
                                + math.sqrt(abar_prev) * x0 / (1 - abar_prev))
    c0, ct = sched.posterior_mean_coefs
    assert sched.posterior_variance[t] == pytest.approx(want_var, rel=1e-9, abs=1e-15)
    assert c0[t] * x0 + ct[t] * xt == pytest.approx(want_mean, rel=1e-9)


def test_respaced_schedule_keeps_alpha_bar_on_the_sub_sequence():
    """Respacing keeps alpha_bar at the chosen steps (the linear schedule's closed-form
    product, here in plain Python) and gives the full schedule back on arange(T)."""
    sched = ddpm.schedule_of(CFG)
    seq = np.array([0, 3, 99, 400, 998])
    sub = sched.respaced(seq)
    want = linear_alpha_bar()[seq]
    np.testing.assert_allclose(sub.alphas_cumprod, want, rtol=1e-12)
    assert sub.betas[0] == pytest.approx(1 - want[0], rel=1e-12)
    assert sub.betas[2] == pytest.approx(1 - want[2] / want[1], rel=1e-12)
    np.testing.assert_allclose(sched.respaced(np.arange(T)).betas, sched.betas, rtol=1e-9)


def test_loss_diffuses_with_z_and_regresses_it():
    """The network sees x_t = sqrt(abar_t) x + sqrt(1 - abar_t) z at the integer t; the
    loss is the mean squared error between its output and z."""
    seen = {}

    def apply_fn(params, x_in, t_cond, labels, train, key):
        seen["x_in"], seen["t"] = np.asarray(x_in, np.float64), np.asarray(t_cond)
        return 0.5 * x_in + 0.01 * t_cond[:, None, None, None] / T

    b = 6
    x = jax.random.uniform(jax.random.PRNGKey(0), (b, 4, 4, 1), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.PRNGKey(1), (b, 4, 4, 1))
    keys = jax.random.split(jax.random.PRNGKey(2), b)
    loss, aux = ddpm.ddpm_loss(apply_fn, CFG, None, None, x, z, 0, keys, keys[0])
    t = seen["t"]
    assert np.all(t == np.round(t)) and np.all((0 <= t) & (t < T)) and len(set(t)) > 1
    abar = linear_alpha_bar()[t.astype(int)][:, None, None, None]
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    np.testing.assert_allclose(seen["x_in"], np.sqrt(abar) * x + np.sqrt(1 - abar) * z,
                               rtol=1e-5, atol=1e-6)
    out = 0.5 * seen["x_in"] + 0.01 * t[:, None, None, None] / T
    assert float(loss) == pytest.approx(np.mean((out - z) ** 2), rel=1e-5)
    assert float(aux["distance"]) == pytest.approx(float(loss))


def test_t_is_uniform_over_all_timesteps():
    cfg = CMConfig(loss="ddpm", num_timesteps=10)
    seen = []

    def apply_fn(params, x_in, t_cond, labels, train, key):
        seen.append(np.asarray(t_cond))
        return x_in

    n = 20_000
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    zeros = jnp.zeros((n, 1, 1, 1))
    ddpm.ddpm_loss(apply_fn, cfg, None, None, zeros, zeros, 0, keys, keys[0])
    counts = np.bincount(seen[0].astype(int), minlength=11)
    assert counts[10] == 0 and counts.sum() == n
    # Each count is Binomial(n, 1/10): mean 2000, std 42.
    assert np.all(np.abs(counts[:10] - n / 10) < 5 * math.sqrt(n * 0.1 * 0.9)), counts


def test_timestep_sub_sequences():
    np.testing.assert_array_equal(ddpm.timesteps(T, 10), np.arange(0, 1000, 100))
    np.testing.assert_array_equal(ddpm.timesteps(T, T), np.arange(T))
    np.testing.assert_array_equal(ddpm.timesteps(T, 3), [0, 333, 666])
    # DDIM's quadratic sequence: floor((i sqrt(800) / 9)^2) = floor(800 i^2 / 81).
    np.testing.assert_array_equal(ddpm.timesteps(T, 10, "quadratic"),
                                  [800 * i * i // 81 for i in range(10)])
    q = ddpm.timesteps(T, 100, "quadratic")  # DDIM's repeats near 0 moved up
    assert len(q) == 100 and np.all(np.diff(q) > 0) and q[0] == 0 and q[-1] == 800
    with pytest.raises(ValueError, match="steps"):
        ddpm.timesteps(T, T + 1)
    with pytest.raises(ValueError, match="skip"):
        ddpm.timesteps(T, 10, "cubic")


# ----------------------------------------------------------------------------------------
# Samplers.


def _toy_eps(x, t):
    return 0.3 * x + 0.2 * np.sin(x) + 1e-3 * t


def _toy_apply(params, x_in, t_cond, labels, train, key):
    return 0.3 * x_in + 0.2 * jnp.sin(x_in) + 1e-3 * t_cond[:, None, None, None]


@pytest.mark.parametrize("steps, seq, clip", [
    (T, np.arange(T), False),
    (10, np.arange(0, T, 100), False),
    (10, np.arange(0, T, 100), True),
])
def test_ddim_eta0_is_the_deterministic_update_step_by_step(steps, seq, clip):
    """x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps, x0_hat = (x - sqrt(1 - a)
    eps) / sqrt(a), from the last timestep of `seq` down to a_prev = 1."""
    x_init = jax.random.normal(jax.random.PRNGKey(0), (4, 4, 4, 1))
    got = ddpm.ddim_loop(_toy_apply, None, CFG, x_init, jax.random.PRNGKey(1), steps,
                         eta=0.0, clip_denoised=clip)
    abar = linear_alpha_bar()
    x = np.asarray(x_init, np.float64)
    for i in reversed(range(len(seq))):
        a = abar[seq[i]]
        a_prev = abar[seq[i - 1]] if i > 0 else 1.0
        eps = _toy_eps(x, seq[i])
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(np.asarray(got), x, rtol=2e-3, atol=2e-4)



@pytest.mark.parametrize("solver, steps, eta", [("ddim", 10, 1.0), ("ddim", 10, 0.5),
                                                ("ddpm", 10, None), ("ddpm", T, None)])
def test_stochastic_samplers_step_by_step(solver, steps, eta):
    """DDIM with eta > 0 and DDPM ancestral sampling, step by step in float64 with the
    sampler's own fresh noise (step i's z drawn from fold_in(key, i), i = 0 at the highest
    timestep; the draws are the only thing taken from the code): DDIM's
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev) (Song et al., eq. 16);
    DDPM's posterior mean (Ho et al., eq. 7) on the sub-sequence's betas
    beta' = 1 - a / a_prev, plus sqrt(beta') z (sigma^2 = beta, "fixedlarge"), no noise
    on the last step. The variance test above sees a wrong sigma only through a sample
    variance within a few percent."""
    shape = (4, 4, 4, 1)
    x_init = jax.random.normal(jax.random.PRNGKey(0), shape)
    key = jax.random.PRNGKey(1)
    if solver == "ddim":
        got = ddpm.ddim_loop(_toy_apply, None, CFG, x_init, key, steps, eta=eta,
                             clip_denoised=False)
    else:
        got = ddpm.ancestral_loop(_toy_apply, None, CFG, x_init, key, steps,
                                  clip_denoised=False)
    seq = (np.arange(steps) * T) // steps
    abar = linear_alpha_bar()
    x = np.asarray(x_init, np.float64)
    for i, j in enumerate(reversed(range(steps))):  # i: loop index, j: position in seq
        a = abar[seq[j]]
        a_prev = abar[seq[j - 1]] if j > 0 else 1.0
        eps = _toy_eps(x, seq[j])
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape), np.float64)
        if solver == "ddim":
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
            x = np.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
        else:
            beta = 1 - a / a_prev
            mean = (math.sqrt(a_prev) * beta * x0
                    + math.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a)
            x = mean + (math.sqrt(beta) * z if j > 0 else 0.0)
    np.testing.assert_allclose(np.asarray(got), x, rtol=2e-3, atol=2e-4)

S2 = 0.5**2  # data N(0, S2) per pixel (sigma_data of images in [-1, 1])


def _exact_gaussian_eps(params, x_in, t_cond, labels, train, key):
    """E[eps | x_t] for x_0 ~ N(0, S2): sqrt(1 - a) x_t / (a S2 + 1 - a)."""
    a = jnp.asarray(linear_alpha_bar(), jnp.float32)[t_cond.astype(jnp.int32)]
    a = a[:, None, None, None]
    return jnp.sqrt(1 - a) * x_in / (a * S2 + 1 - a)


def _predicted_variance(seq, eta=0.0, ancestral=False):
    """Var of the output for x_T ~ N(0, 1) and the exact eps of N(0, S2) data.

    Everything is linear here: eps_hat = ke x and x0_hat = k0 x, so one step maps a
    variance v to k^2 v + sigma^2 with the scalar k of DDIM (Song et al., eq. 12) or of
    DDPM's posterior mean (Ho et al., eq. 7; sigma^2 = beta on the sub-sequence).
    """
    abar, v = linear_alpha_bar(), 1.0
    for i in reversed(range(len(seq))):
        a = abar[seq[i]]
        a_prev = abar[seq[i - 1]] if i > 0 else 1.0
        ke = math.sqrt(1 - a) / (a * S2 + 1 - a)
        k0 = (1 - math.sqrt(1 - a) * ke) / math.sqrt(a)
        if ancestral:
            beta = 1 - a / a_prev
            k = (math.sqrt(a_prev) * beta * k0 + math.sqrt(1 - beta) * (1 - a_prev)) / (1 - a)
            var = beta if i > 0 else 0.0
        else:
            var = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            k = math.sqrt(a_prev) * k0 + math.sqrt(1 - a_prev - var) * ke
        v = k * k * v + var
    return v


UNIFORM_100 = np.arange(0, T, 10)
QUADRATIC_100 = ddpm.timesteps(T, 100, "quadratic")  # checked in test_timestep_sub_sequences


@pytest.mark.parametrize("solver, skip, steps, eta, seq, tol", [
    ("ddim", "uniform", 100, 0.0, UNIFORM_100, 0.06),  # 5.5% low: DDIM's own error
    ("ddim", "quadratic", 100, 0.0, QUADRATIC_100, 0.04),  # 2.9% low
    ("ddim", "uniform", 100, 1.0, UNIFORM_100, None),  # 12% low: no claim, see below
    ("ddpm", "uniform", T, 0.0, np.arange(T), 0.02),  # 0.3% high
    ("ddpm", "uniform", 100, 0.0, UNIFORM_100, None),  # respaced; sigma^2 = beta' matters
])
def test_samplers_recover_the_variance_of_gaussian_data(solver, skip, steps, eta, seq, tol):
    """With the exact eps of N(0, S2) data the samplers give about S2; and exactly (up to
    sampling error) the variance the sampler's own discretisation predicts."""
    shape = (512, 8, 8, 1)
    x_init = jax.random.normal(jax.random.PRNGKey(0), shape)
    key = jax.random.PRNGKey(1)
    if solver == "ddim":
        out = ddpm.ddim_loop(_exact_gaussian_eps, None, CFG, x_init, key, steps, eta, skip,
                             clip_denoised=False)
    else:
        out = ddpm.ancestral_loop(_exact_gaussian_eps, None, CFG, x_init, key, steps, skip,
                                  clip_denoised=False)
    var, predicted = float(jnp.var(out)), _predicted_variance(seq, eta, solver == "ddpm")
    if tol is not None:
        assert var == pytest.approx(S2, rel=tol)
    if solver == "ddim" and eta == 0.0:  # deterministic, linear in x_T: no sampling error
        assert var / float(jnp.var(x_init)) == pytest.approx(predicted, rel=2e-3)
    else:  # fresh noise: the variance of 32768 values is within ~0.8% (1 std)
        assert var == pytest.approx(predicted, rel=0.03)
    assert abs(float(jnp.mean(out))) < 0.02


# ----------------------------------------------------------------------------------------
# End to end.


def _tiny_ddpm_config(**overrides):
    from configs import digits_ddpm

    config = digits_ddpm.get_config("smoke")
    small = tiny_config()
    config.data = small.data
    # One level, no attention (the assignment tests are about the loss's inputs); the
    # end-to-end test below puts the U-Net's second level and attention back.
    config.model.nf, config.model.ch_mult = 8, (1,)
    config.model.num_res_blocks, config.model.attn_resolutions = 1, ()
    config.cm.num_timesteps = 20
    config.eval.samplers = ("ddim10",)  # within T = 20 (checked when the run starts)
    config.training.n_iters, config.training.snapshot_every = 2, 2
    config.training.sample_every = 2
    config.training.n_grid = 8
    config.training.batch_size = 8
    return override(config, **overrides)


def test_ddpm_config_trains_samples_and_evaluates(tmp_path):
    from evaluation import run as eval_run

    # Two levels and attention at 4x4: the U-Net's down/up-sampling and attention train.
    config = _tiny_ddpm_config(**{"model.ch_mult": (1, 2), "model.attn_resolutions": (4,)})
    last = train.train(config, str(tmp_path))
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert last["num_scales"] == 0 and last["mu"] == 0.0
    assert os.path.exists(tmp_path / "samples" / "step_00000002.png")

    saved = workdir.load_config(str(tmp_path))
    saved.sample.n, saved.sample.solver, saved.sample.steps = 4, "ddim", 5
    saved.sample.eta = 0.5
    path = sample_run.sample(saved, str(tmp_path))
    assert os.path.basename(path).endswith("_ddim5_eta0.5.npz")
    with np.load(path) as f:
        assert f["images"].shape == (4, 8, 8, 1)
    saved.sample.solver, saved.sample.steps = "ddpm", 20  # ancestral over all T steps
    with np.load(sample_run.sample(saved, str(tmp_path))) as f:
        assert f["images"].shape == (4, 8, 8, 1) and f["images"].std() > 0

    ev = workdir.load_config(str(tmp_path))
    ev.eval.samplers = ("heun18",)  # an EDM solver: refused, with this run's names
    with pytest.raises(ValueError, match="ddim or ddpm"):
        eval_run.evaluate(ev, str(tmp_path))
    ev.eval.samplers, ev.eval.n_samples, ev.eval.batch_size = ("ddim3", "ddpm20"), 8, 8
    ev.eval.stats_path = str(tmp_path / "ref.npz")
    rows = eval_run.evaluate(ev, str(tmp_path))
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("ddim3", 3), ("ddpm20", 20)]
    assert rows[0]["ts"] == [13.0, 6.0, 0.0] and rows[0]["eta"] == 0.0
    assert rows[1]["ts"] == list(np.arange(19, -1, -1.0)) and "eta" not in rows[1]
    assert all(np.isfinite(r["fd_pixels"]) and r["fd_pixels"] > 0 for r in rows)
    assert eval_run.evaluate(ev, str(tmp_path)) == rows  # done rows are not recomputed
    ev.eval.eta, ev.eval.samplers = 1.0, ("ddim3",)  # another eta: another row
    (row,) = eval_run.evaluate(ev, str(tmp_path))
    assert row["eta"] == 1.0 and row["fd_pixels"] != rows[0]["fd_pixels"]
    ev.eval.skip = "quadratic"  # quadratic: floor(16 i^2 / 4) = 0, 4, 16
    (row,) = eval_run.evaluate(ev, str(tmp_path))
    assert row["ts"] == [16.0, 4.0, 0.0]
    assert len(eval_run.read_results(str(tmp_path))) == 4


def edm_cfg():
    return CMConfig(loss="edm")


def test_sampler_names_and_checks():
    sampling = ddpm.SAMPLING
    assert sampling.parse("ddim50") == ("ddim", 50) and sampling.parse("ddpm1000") == (
        "ddpm", 1000)
    assert sampling.parse("ddim0") is None and sampling.parse("ddim") is None
    nfe = {s: sampling.named(CFG, s, SampleOptions()).nfe
           for s in ("ddim10", "ddim50", "ddim100", "ddpm1000")}
    assert list(nfe.values()) == [10, 50, 100, 1000]
    assert edm.SAMPLING.named(edm_cfg(), "heun18", SampleOptions()).nfe == 35
    with pytest.raises(ValueError, match="ddim"):
        sampling.named(CFG, "heun18", SampleOptions())
    with pytest.raises(ValueError, match="steps"):
        sampling.named(CFG, f"ddpm{T + 1}", SampleOptions())
    with pytest.raises(ValueError, match="eta"):
        sampling.named(CFG, "ddim10", SampleOptions(eta=1.5))
    with pytest.raises(ValueError, match="sample"):
        config_lib.for_training(_tiny_ddpm_config(**{"sample.solver": "euler"}))


@pytest.mark.parametrize("method", ["none", "linear"])
def test_with_assignment_the_loss_sees_permuted_eps_and_untouched_images(method, tmp_path,
                                                                        monkeypatch):
    """Records the (x, z) each device's shard hands the DDPM loss and compares them with
    the batcher's raw batch: images identical; eps a permutation of the shard's drawn
    noise, the identity for vanilla and not for `linear` (scope=device)."""
    seen: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def record(step, shard, x, z):
        seen[(int(step), int(shard))] = (np.asarray(x), np.asarray(z))

    def recording_loss(apply_fn, cfg, params, target, x, z, step, *args, **kwargs):
        jax.debug.callback(record, step, jax.lax.axis_index("data"), x, z)
        return ddpm.ddpm_loss(apply_fn, cfg, params, target, x, z, step, *args, **kwargs)

    monkeypatch.setitem(objectives.REGISTRY, "ddpm",
                        dataclasses.replace(objectives.get("ddpm"), loss=recording_loss))
    config = _tiny_ddpm_config(**{"assignment.method": method, "training.batch_size": 64,
                                  "training.sample_every": 0})
    train.train(config, str(tmp_path))
    batcher = data.Batcher(data.load_digits(8), 64, config.training.seed, random_flip=False)
    n_dev = jax.device_count()
    assert sorted(seen) == [(s, d) for s in range(2) for d in range(n_dev)]
    moved = 0
    for (step, shard), (x, z) in seen.items():
        raw = batcher.batch(step)
        rows = slice(shard * 8, (shard + 1) * 8)
        np.testing.assert_array_equal(x, raw["x"][rows])  # images untouched
        # eps: each row one of the shard's drawn noises, each used once.
        drawn = raw["z"][rows].reshape(8, -1)
        match = [np.nonzero((drawn == row).all(axis=1))[0] for row in z.reshape(8, -1)]
        assert all(len(m) == 1 for m in match)
        perm = np.array([m[0] for m in match])
        assert sorted(perm) == list(range(8))
        moved += int(np.any(perm != np.arange(8)))
    if method == "none":
        assert moved == 0
    else:
        assert moved > 0


@pytest.mark.parametrize("name, n_params", [("cifar10_ddpm", 35_746_307),
                                            ("digits_ddpm", 701_345),
                                            ("fashion_ddpm", 280_177)])
def test_ddpm_configs_have_the_parameter_counts_their_docs_state(name, n_params):
    """The counts quoted in the configs and the README, from the shapes alone (no init)."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.cm.loss == "ddpm" and config.model.name == "ddpm_unet"
    module = nets.build_model(config)
    shapes = jax.eval_shape(lambda: nets.init_params(module, jax.random.PRNGKey(0), config))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n_params
    doc = importlib.import_module(f"configs.{name}").__doc__
    assert f"{n_params:,}" in doc
