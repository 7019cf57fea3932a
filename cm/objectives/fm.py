"""Flow matching (conditional flow matching with straight paths; rectified flow, I-CFM with
sigma 0; Lipman et al. 2023, Liu et al. 2023, Tong et al. 2024).

x_t = (1 - t) x + t z for data x (t = 0) and noise z (t = 1); the network predicts the
velocity v = z - x = dx_t/dt from (x_t, t), with the mean squared error over pixels as
the loss. t is uniform on [0, 1] (`cm.fm_time=uniform`) or logit-normal, t = sigmoid(m +
s n) with n ~ N(0, 1) (SD3's; `cm.fm_time=logit_normal`, m and s from `cm.fm_logit_mean`
and `cm.fm_logit_std`). The network's time input is t * `cm.fm_t_scale` (1000: the
integer-timestep range the DDPM U-Net's sinusoidal embedding is built for; torchcfm feeds
t itself, scale 1). The noise z is an argument of the loss, so every assignment method
pairs it: `linear` with `cost=sqeuclidean` is exact minibatch OT (OT-CFM's coupling
without its sampling from the plan, see `cm.pairing`), `cost=l2` is immiscible
assignment, `knn` the authors' KNN noise selection.

Sampling integrates dx/dt = v(x, t) from t = 1 (x ~ N(0, I)) to t = 0: `euler{N}` and
`heun{N}` on N uniform steps (N and 2N network calls), and `dopri5` (Dormand-Prince with
an adaptive step, diffrax; rtol = atol = 1e-5 as torchcfm's FID evaluation, or
`dopri5_<tol>` for another, e.g. `dopri5_1e-3`), whose network calls are counted per
batch (6 per attempted step and one more; the step size is chosen for the whole batch,
as torchdiffeq does, so it depends on the batch). A batch that needs more than
`MAX_STEPS` attempts returns a NaN count, which evaluation refuses.
"""

import re

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from cm.objectives.spec import (
    ApplyFn,
    Objective,
    PyTree,
    SampleOptions,
    Sampler,
    Solver,
    SolverSampling,
)
from cm.runtime.views import CMConfig, ConfigError

TIMES = ("uniform", "logit_normal")
DOPRI5_TOL = 1e-5  # torchcfm's CIFAR-10 FID evaluation (atol = rtol = 1e-5)
MAX_STEPS = 4096  # dopri5 attempts at most (a batch that needs more fails loudly)
_DOPRI5 = re.compile(r"^dopri5(?:_(\d+(?:\.\d+)?e-?\d+|0?\.\d+))?$")


def sample_times(cfg: CMConfig, keys: jax.Array) -> jax.Array:
    """t per example key `[B]`: uniform on [0, 1], or logit-normal."""
    if cfg.fm_time == "uniform":
        return jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)
    n = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
    return jax.nn.sigmoid(cfg.fm_logit_mean + cfg.fm_logit_std * n)


def velocity(apply_fn: ApplyFn, params: PyTree, x: jax.Array, t: jax.Array, cfg: CMConfig,
             labels: jax.Array | None = None, train: bool = False,
             dropout_key: jax.Array | None = None) -> jax.Array:
    """v_theta(x, t) for x `[B,H,W,C]` and t `[B]` in [0, 1]."""
    return apply_fn(params, x, t * cfg.fm_t_scale, labels, train, dropout_key)


def fm_loss(apply_fn: ApplyFn, cfg: CMConfig, params: PyTree, target_params: PyTree | None,
            x: jax.Array, z: jax.Array, step: jax.Array, example_keys: jax.Array,
            dropout_key: jax.Array, labels: jax.Array | None = None,
            ) -> tuple[jax.Array, dict]:
    """Mean over examples of mean_pixels (v_theta(x_t, t) - (z - x))^2 on one shard.

    The objective table's loss signature (`target_params` and `step` are unused); one t
    per example from its key in `example_keys`; `z` `[B,H,W,C]` is the (paired) noise.
    """
    del target_params, step
    t = sample_times(cfg, example_keys)  # [B]
    b = t[:, None, None, None]
    x_t = (1.0 - b) * x + b * z
    v = velocity(apply_fn, params, x_t, t, cfg, labels, True, dropout_key)
    err = jnp.mean(((v - (z - x)) ** 2).reshape(x.shape[0], -1), axis=1)  # [B]
    loss = jnp.mean(err)
    return loss, {"distance": loss}


def _grid(steps: int) -> np.ndarray:
    return np.linspace(1.0, 0.0, steps + 1)


def _times(cfg: CMConfig, steps: int, options: SampleOptions) -> np.ndarray:
    return _grid(steps)


def _fixed(method: str):
    def sample(apply_fn, params, cfg, key, shape, labels, steps, options):
        ts = jnp.asarray(_grid(steps), jnp.float32)
        b = shape[0]
        v = lambda x, t: velocity(apply_fn, params, x, jnp.full((b,), t), cfg, labels)  # noqa: E731

        def euler(i, x):
            return x + (ts[i + 1] - ts[i]) * v(x, ts[i])

        def heun(i, x):
            dt = ts[i + 1] - ts[i]
            d = v(x, ts[i])
            return x + dt * 0.5 * (d + v(x + dt * d, ts[i + 1]))

        x = jax.random.normal(key, shape)
        return jax.lax.fori_loop(0, steps, euler if method == "euler" else heun, x)

    return sample


def dopri5(apply_fn: ApplyFn, params: PyTree, cfg: CMConfig, key: jax.Array,
           shape: tuple[int, ...], labels: jax.Array | None, tol: float,
           ) -> tuple[jax.Array, jax.Array]:
    """Adaptive Dormand-Prince from t = 1 to 0 (diffrax); (the end point, not clipped,
    network calls per image)."""
    b = shape[0]

    def field(t, x, args):
        return velocity(apply_fn, params, x, jnp.full((b,), t), cfg, labels)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Dopri5(), t0=1.0, t1=0.0, dt0=None,
        y0=jax.random.normal(key, shape), saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), max_steps=MAX_STEPS,
        throw=False)  # a host callback that would gather the sharded batch; checked below
    # First-same-as-last: 6 new evaluations per attempted step, plus the first one
    # (counted against the vector field itself in tests/test_fm.py).
    nfe = 6 * sol.stats["num_steps"] + 1
    ok = sol.result == diffrax.RESULTS.successful  # else a NaN count: the caller raises
    return sol.ys[-1], jnp.where(ok, nfe, jnp.nan)


class FlowSampling(SolverSampling):
    """`euler{N}`, `heun{N}` and the adaptive `dopri5[_tol]`."""

    def named(self, cfg, name, options):
        m = _DOPRI5.match(str(name))
        if m is None:
            return super().named(cfg, name, options)
        tol = float(m.group(1)) if m.group(1) else DOPRI5_TOL
        if not 0 < tol < 1:
            raise ConfigError(f"{name}: the tolerance must be in (0, 1), got {tol}")

        def sample(apply_fn, params, cfg, key, shape, labels):
            return dopri5(apply_fn, params, cfg, key, shape, labels, tol)

        # nfe None: counted per batch; times: the interval (the steps are the solver's).
        return Sampler(name, (1.0, 0.0), None, None, name, sample)

    def usable(self, field, value):
        if field == "eval.samplers":
            return bool(value) and all(self.parse(n) or _DOPRI5.match(str(n)) for n in value)
        return super().usable(field, value)


SAMPLING = FlowSampling(
    {"euler": Solver(lambda s: s, _times, _fixed("euler")),
     "heun": Solver(lambda s: 2 * s, _times, _fixed("heun"))},
    default_solver="euler", default_steps=50, kind="ODE solvers (euler, heun, dopri5)",
    examples='"euler50","dopri5"', config_file="configs/cifar10_fm.py")


def _check(cfg: CMConfig) -> None:
    if cfg.fm_time not in TIMES:
        raise ConfigError(f"cm.fm_time must be one of {TIMES}, got {cfg.fm_time!r}")
    if cfg.fm_logit_std <= 0:
        raise ConfigError(f"cm.fm_logit_std must be positive, got {cfg.fm_logit_std}")
    if cfg.fm_t_scale <= 0:
        raise ConfigError(f"cm.fm_t_scale must be positive, got {cfg.fm_t_scale}")


OBJECTIVE = Objective(
    name="fm",
    summary="flow matching: straight paths x_t = (1 - t) x + t z, velocity z - x",
    loss=fm_loss,
    sampling=SAMPLING,
    reads=("fm_time", "fm_logit_mean", "fm_logit_std", "fm_t_scale"),
    meaning_fields=("fm_t_scale",),
    objective_fields=("fm_time", "fm_logit_mean", "fm_logit_std"),
    check=_check,
)
