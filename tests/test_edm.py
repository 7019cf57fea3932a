"""EDM: preconditioning and loss by hand, ODE samplers on Gaussian data, a short run."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm import init_from, objectives, sample_run, train
from cm import setup as setup_lib
from cm.objectives import SampleOptions, edm
from cm.runtime import checkpoints, workdir
from cm.runtime.views import CMConfig, EvalConfig
from tests.helpers import tiny_config

CFG = CMConfig(loss="edm", p_mean=-1.2, p_std=1.2)


def test_preconditioning_by_hand():
    c_skip, c_out, c_in, c_noise = edm.scalings(jnp.array([2.0]), 0.5)
    assert float(c_skip[0]) == pytest.approx(0.25 / 4.25)
    assert float(c_out[0]) == pytest.approx(2 * 0.5 / math.sqrt(4.25))
    assert float(c_in[0]) == pytest.approx(1 / math.sqrt(4.25))
    assert float(c_noise[0]) == pytest.approx(0.25 * math.log(2.0))
    assert float(edm.loss_weight(jnp.array(2.0), 0.5)) == pytest.approx(4.25 / 1.0)


def test_loss_by_hand():
    """With F(x_in, c_noise) = 0.5 x_in + c_noise the loss has a closed form.

    F is not zero, so c_in, c_out and c_noise all reach the loss; F checks that the loss
    runs the network in training mode (dropout on).
    """

    def apply_fn(p, x_in, t_cond, labels, train, key):
        assert train, "the EDM loss must run the network in training mode"
        return 0.5 * x_in + t_cond[:, None, None, None]

    x = jax.random.uniform(jax.random.PRNGKey(0), (5, 4, 4, 1), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.PRNGKey(1), (5, 4, 4, 1))
    keys = jax.random.split(jax.random.PRNGKey(2), 5)
    loss, _ = edm.edm_loss(apply_fn, CFG, None, None, x, z, 0, keys, keys[0])
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    want = 0.0
    for i, k in enumerate(keys):
        sigma = math.exp(-1.2 + 1.2 * float(jax.random.normal(k, ())))
        noisy = x[i] + sigma * z[i]
        c_skip = 0.25 / (sigma**2 + 0.25)
        c_out = sigma * 0.5 / math.sqrt(sigma**2 + 0.25)
        c_in = 1 / math.sqrt(sigma**2 + 0.25)
        denoised = c_skip * noisy + c_out * (0.5 * c_in * noisy + 0.25 * math.log(sigma))
        err = np.mean((denoised - x[i]) ** 2)
        want += (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * err / 5
    assert float(loss) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("solver, steps, tol", [("heun", 40, 0.02), ("euler", 200, 0.05)])
def test_ode_sampler_recovers_gaussian_variance(solver, steps, tol):
    """For data N(0, s^2) the exact denoiser is s^2 / (s^2 + sigma^2) x."""
    s2 = 0.3**2

    def exact_apply(params, x_in, t_cond, labels, train, key):
        sigma = jnp.exp(4.0 * t_cond)[:, None, None, None]
        c_skip, c_out, c_in, _ = edm.scalings(sigma, 0.5)
        x = x_in / c_in
        return (s2 / (s2 + sigma**2) * x - c_skip * x) / c_out

    cfg = CMConfig(loss="edm", sigma_max=20.0)
    out = edm.ode_sample(exact_apply, None, cfg, jax.random.PRNGKey(0), (256, 8, 8, 1), steps,
                         solver)
    # The exact ODE maps sigma_max z to s z (sqrt(s^2 + 20^2) / 20 - 1 < 1e-4).
    want = s2 * float(jnp.var(jax.random.normal(jax.random.PRNGKey(0), (256, 8, 8, 1))))
    assert float(jnp.var(out)) == pytest.approx(want, rel=tol)
    # Heun is second order: more accurate than Euler at the same number of steps.
    if solver == "heun":
        euler = edm.ode_sample(exact_apply, None, cfg, jax.random.PRNGKey(0), (256, 8, 8, 1),
                               steps, "euler")
        assert abs(float(jnp.var(out)) - want) < abs(float(jnp.var(euler)) - want)


def test_karras_steps_end_points():
    t = edm.karras_steps(18, 0.002, 80.0, 7.0)
    assert t[0] == pytest.approx(80.0) and t[-2] == pytest.approx(0.002) and t[-1] == 0.0
    assert np.all(np.diff(t) < 0)


def test_edm_config_trains_and_samples(tmp_path):
    from configs import cifar10_edm

    config = cifar10_edm.get_config("smoke")
    small = tiny_config()
    config.data, config.model = small.data, small.model
    config.model.dropout = 0.13
    config.training.n_iters, config.training.snapshot_every = 2, 2
    config.training.sample_every = 0
    train.train(config, str(tmp_path))
    saved = workdir.load_config(str(tmp_path))
    saved.sample.n, saved.sample.solver = 4, "euler"
    path = sample_run.sample(saved, str(tmp_path))
    assert os.path.basename(path).endswith("_euler4.npz")
    with np.load(path) as f:
        assert f["images"].shape == (4, 8, 8, 1)
    from evaluation import run as eval_run

    # --mode eval: ODE samplers by name; consistency sampler names are refused.
    ev = workdir.load_config(str(tmp_path))
    assert tuple(ev.eval.samplers) == ("heun18",)  # cifar10_edm's default
    ev.eval.samplers = ("1step", "heun2")  # a mix: refused
    with pytest.raises(ValueError, match="heun18"):
        eval_run.evaluate(ev, str(tmp_path))
    ev.eval.samplers, ev.eval.n_samples, ev.eval.batch_size = ("heun2", "euler3"), 8, 8
    ev.eval.stats_path = str(tmp_path / "ref.npz")
    rows = eval_run.evaluate(ev, str(tmp_path))
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("heun2", 3), ("euler3", 3)]
    assert rows[0]["ts"] == pytest.approx(list(edm.karras_steps(2, 0.002, 80.0, 7.0)))
    assert len(rows[1]["ts"]) == 4
    assert all(np.isfinite(r["fd_pixels"]) and r["fd_pixels"] > 0 for r in rows)
    assert rows[0]["fd_pixels"] != rows[1]["fd_pixels"]
    assert eval_run.evaluate(ev, str(tmp_path)) == rows  # done rows are not recomputed
    # Consistency names only (e.g. a run saved before EDM evaluation existed): the run's
    # own sampler, sample.solver + sample.steps, is evaluated instead.
    ev.eval.samplers = ("1step", "2step")
    ev.sample.solver, ev.sample.steps = "euler", 3
    saved = workdir.load_config(str(tmp_path))
    saved.sample.solver, saved.sample.steps = "euler", 3
    workdir.write_config(str(tmp_path), saved)
    assert eval_run.evaluate(ev, str(tmp_path)) == [rows[1]]  # euler3, already done


def test_eval_sampler_names_follow_the_kind_of_model():
    from evaluation import run as eval_run

    del eval_run
    assert edm.SAMPLING.parse("heun18") == ("heun", 18)
    assert edm.SAMPLING.parse("euler0") is None
    assert edm.SAMPLING.parse("2step") is None
    ct_cfg, edm_cfg = CMConfig(loss="ct"), CMConfig(loss="edm")
    assert [objectives.get(c.loss).sampling.named(c, s, SampleOptions()).nfe for c, s in (
        (ct_cfg, "1step"), (ct_cfg, "2step"), (edm_cfg, "heun18"),
        (edm_cfg, "euler50"))] == [1, 2, 35, 50]
    ev = EvalConfig(samplers=("heun18",))
    edm.SAMPLING.check_eval(edm_cfg, ev)
    with pytest.raises(ValueError, match="for EDM runs"):
        objectives.get("ct").sampling.check_eval(ct_cfg, ev)
    with pytest.raises(ValueError, match="ODE solvers"):
        edm.SAMPLING.check_eval(edm_cfg, EvalConfig(samplers=("1step",)))


def _leaves(tree):
    return jax.tree.leaves(jax.device_get(tree))


def test_consistency_distillation_from_a_tiny_teacher(tmp_path):
    from configs import cifar10_cd, cifar10_edm

    small = tiny_config()
    teacher = cifar10_edm.get_config("smoke")
    teacher.data, teacher.model = small.data, small.model
    teacher.training.n_iters, teacher.training.snapshot_every = 2, 2
    teacher.training.sample_every = 0
    train.train(teacher, str(tmp_path / "edm"))

    config = cifar10_cd.get_config("smoke")
    config.data, config.model = small.data, small.model
    config.cm.metric = "pseudo_huber"  # LPIPS needs RGB; the digits are grey
    # Snapshots at every step: step 1's is read below (keep_snapshots = 3).
    config.training.n_iters, config.training.snapshot_every = 3, 1
    config.training.sample_every = 0
    # A fast EMA: at 0.9999 the EMA after one update is within float32 tolerance of the
    # teacher whether or not it saw the updated parameters (checked below).
    config.training.ema_rates = (0.9,)
    config.cm.teacher_workdir = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train the EDM teacher"):
        train.train(config, str(tmp_path / "cd_missing"))
    config.cm.teacher_workdir = str(tmp_path / "edm")
    # The teacher step preconditions the teacher with the student's sigma_data: a teacher
    # trained with another value would be misapplied, silently.
    config.cm.sigma_data = 0.25
    with pytest.raises(ValueError, match=r"trained with cm.sigma_data=0.5 but the student"):
        setup_lib.load_teacher(config)
    config.cm.sigma_data = 0.5

    # Before the first update the student is its teacher as the OpenAI JAX code's
    # finetune=True makes it: online and target from the teacher's raw parameters, the EMA
    # from the teacher's EMA (which differ here: the teacher trained 2 steps, EMA ~0.99999).
    _, teacher_ema = setup_lib.load_teacher(config)
    tckpt = checkpoints.Checkpointer(str(tmp_path / "edm"))
    teacher_state = tckpt.restore(setup_lib.Setup(teacher).abstract_state())
    tckpt.close()
    raw = _leaves(teacher_state.params)
    want = _leaves(teacher_ema)
    assert max(float(np.abs(a - b).max()) for a, b in zip(raw, want, strict=True)) > 1e-5
    start = init_from.initial_state(config, setup_lib.Setup(config))
    for tree, ref in ((start.params, raw), (start.target_params, raw),
                      *((e, want) for e in start.ema_params)):
        for a, b in zip(_leaves(tree), ref, strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(start.step) == 0

    last = train.train(config, str(tmp_path / "cd"))
    assert last["step"] == 3 and np.isfinite(last["loss"])
    assert last["num_scales"] == 18 and last["mu"] == 0.0  # CIFAR-10 CD: target = online

    # The same path in train(): after one real update (the run's step-1 snapshot) the EMA
    # is r * teacher's EMA + (1 - r) * online and the target (mu = 0) is the online network.
    ckpt = checkpoints.Checkpointer(str(tmp_path / "cd"))
    assert ckpt.snapshot_steps() == [1, 2, 3]
    state = ckpt.restore(setup_lib.Setup(config).abstract_state(), step=1)
    ckpt.close()
    assert int(state.step) == 1
    (rate,) = config.training.ema_rates
    moved = 0.0
    for t, r0, p, tg, e in zip(want, raw, _leaves(state.params), _leaves(state.target_params),
                               _leaves(state.ema_params[0]), strict=True):
        np.testing.assert_array_equal(tg, p)
        np.testing.assert_allclose(e, rate * t + (1 - rate) * p, rtol=1e-5, atol=1e-7)
        moved = max(moved, float(np.max(np.abs(p - r0))))
    assert moved > 0, "the update must move the parameters for this check to mean anything"


def test_heun_step_matches_the_sampler():
    apply_fn = lambda p, x, t, labels, train, key: 0.1 * x  # noqa: E731
    cfg = CMConfig(loss="edm", sigma_max=10.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1)) * 10.0
    ts = edm.karras_steps(2, cfg.sigma_min, cfg.sigma_max, cfg.rho)  # [10, 0.002, 0]
    step = edm.heun_step(apply_fn, None, x, jnp.full((3,), ts[0]), jnp.full((3,), ts[1]), 0.5)
    d = lambda x, t: (x - edm.denoise(apply_fn, None, x, jnp.full((3,), t), 0.5)) / t  # noqa
    x1 = x + (ts[1] - ts[0]) * d(x, ts[0])
    want = x + (ts[1] - ts[0]) * 0.5 * (d(x, ts[0]) + d(x1, ts[1]))
    np.testing.assert_allclose(step, want, rtol=1e-5, atol=1e-6)


def test_class_conditional_edm_trains_and_samples_a_class(tmp_path):
    from configs import cifar10_edm

    small = tiny_config(**{"model.num_classes": 10})
    config = cifar10_edm.get_config("smoke")
    config.data, config.model = small.data, small.model
    config.training.n_iters, config.training.snapshot_every = 2, 2
    config.training.sample_every = 2
    config.training.n_grid = 10
    last = train.train(config, str(tmp_path))
    assert np.isfinite(last["loss"])
    assert os.path.exists(tmp_path / "samples" / "step_00000002.png")
    saved = workdir.load_config(str(tmp_path))
    saved.sample.n, saved.sample.label = 4, 7
    with np.load(sample_run.sample(saved, str(tmp_path))) as f:
        assert f["images"].shape == (4, 8, 8, 1)
