"""EDM diffusion training (Karras et al. 2022) and its deterministic samplers.

Denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with c_skip =
sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 +
sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4; sigma
~ lognormal(P_mean, P_std); loss weight lambda = (sigma^2 + sigma_data^2) /
(sigma sigma_data)^2. The noise `z` is an argument, so assignment pairs it with the
images exactly as for consistency training. Samplers: Heun (EDM's, `heun18` is 35
network calls) and Euler (= DDIM) on the Karras times.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cm.objectives.spec import ApplyFn, Objective, PyTree, Solver, SolverSampling
from cm.runtime.views import CMConfig


def scalings(sigma: jax.Array, sigma_data: float):
    """EDM preconditioning (c_skip, c_out, c_in, c_noise) for times `sigma` [B]."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoise(apply_fn: ApplyFn, params: PyTree, x: jax.Array, sigma: jax.Array,
            sigma_data: float, labels: jax.Array | None = None, train: bool = False,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """D_theta(x, sigma) for x [B,H,W,C] and sigma [B]."""
    c_skip, c_out, c_in, c_noise = scalings(sigma, sigma_data)
    b = lambda c: c[:, None, None, None]  # noqa: E731
    out = apply_fn(params, b(c_in) * x, c_noise, labels, train, dropout_key)
    return b(c_skip) * x + b(c_out) * out


def sample_sigmas(keys: jax.Array, p_mean: float, p_std: float) -> jax.Array:
    """sigma = exp(P_mean + P_std n), n ~ N(0, 1), one per example key `[B]`."""
    n = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
    return jnp.exp(p_mean + p_std * n)


def edm_loss(apply_fn: ApplyFn, cfg: CMConfig, params: PyTree,
             target_params: PyTree | None, x: jax.Array, z: jax.Array, step: jax.Array,
             example_keys: jax.Array, dropout_key: jax.Array,
             labels: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """EDM loss on one shard, mean over examples of lambda(sigma) * mean_pixels (D - x)^2.

    The objective table's loss signature (`target_params` and `step` are unused);
    `cfg.p_mean` / `cfg.p_std` give the lognormal sigma distribution.
    """
    del target_params, step
    sigma = sample_sigmas(example_keys, cfg.p_mean, cfg.p_std)  # [B]
    noisy = x + sigma[:, None, None, None] * z
    d = denoise(apply_fn, params, noisy, sigma, cfg.sigma_data, labels, True, dropout_key)
    err = jnp.mean(((d - x) ** 2).reshape(x.shape[0], -1), axis=1)  # [B]
    loss = jnp.mean(loss_weight(sigma, cfg.sigma_data) * err)
    return loss, {"distance": jnp.mean(err)}


def karras_steps(n: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """Descending sampling times t_0 = sigma_max > ... > t_{n-1} = sigma_min, then t_n = 0."""
    i = np.arange(n, dtype=np.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t = (hi + i / max(n - 1, 1) * (lo - hi)) ** rho
    return np.append(t, 0.0)


def heun_step(apply_fn: ApplyFn, params: PyTree, x: jax.Array, t: jax.Array,
              t_next: jax.Array, sigma_data: float, labels: jax.Array | None = None,
              ) -> jax.Array:
    """One Heun step of the probability-flow ODE from times `t` to `t_next` > 0, both [B]."""
    b = lambda v: v[:, None, None, None]  # noqa: E731
    d = (x - denoise(apply_fn, params, x, t, sigma_data, labels)) / b(t)
    x_euler = x + b(t_next - t) * d
    d_next = (x_euler - denoise(apply_fn, params, x_euler, t_next, sigma_data, labels)) / b(t_next)
    return x + b(t_next - t) * 0.5 * (d + d_next)


def ode_sample(apply_fn: ApplyFn, params: PyTree, cfg: CMConfig,
               key: jax.Array, shape: tuple[int, ...], steps: int, solver: str = "heun",
               labels: jax.Array | None = None) -> jax.Array:
    """Deterministic probability-flow ODE sampling (EDM Algorithm 1 without churn).

    `solver="heun"` is EDM's second-order method (2 steps - 1 network calls);
    `"euler"` is the first-order method, equivalent to DDIM. Returns images in [-1, 1].
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be heun or euler, got {solver!r}")
    ts = jnp.asarray(karras_steps(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho), jnp.float32)
    b = shape[0]
    x = ts[0] * jax.random.normal(key, shape)

    def slope(x, t):
        d = denoise(apply_fn, params, x, jnp.full((b,), t, jnp.float32), cfg.sigma_data, labels)
        return (x - d) / t

    def euler(i, x):
        return x + (ts[i + 1] - ts[i]) * slope(x, ts[i])

    def heun(i, x):  # only where t_{i+1} > 0
        t, t_next = ts[i], ts[i + 1]
        d = slope(x, t)
        x_next = x + (t_next - t) * d
        return x + (t_next - t) * 0.5 * (d + slope(x_next, t_next))

    # Loops, not unrolled Python: one or two copies of the network in the compiled
    # program whatever the number of steps (heun18 unrolled held 35).
    if solver == "heun":  # Heun down to t_{N-1}, then an Euler step to 0 (EDM Alg. 1)
        x = jax.lax.fori_loop(0, steps - 1, heun, x)
        x = euler(steps - 1, x)
    else:
        x = jax.lax.fori_loop(0, steps, euler, x)
    return x


def _karras(cfg: CMConfig, steps: int, options) -> np.ndarray:
    return karras_steps(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)


def _ode(solver: str):
    def sample(apply_fn, params, cfg, key, shape, labels, steps, options):
        return ode_sample(apply_fn, params, cfg, key, shape, steps, solver, labels)

    return sample


SAMPLING = SolverSampling(
    {"heun": Solver(lambda s: 2 * s - 1, _karras, _ode("heun")),  # last step Euler
     "euler": Solver(lambda s: s, _karras, _ode("euler"))},
    default_solver="heun", default_steps=18, kind="ODE solvers",
    examples='"heun18","euler50"', config_file="configs/cifar10_edm.py")

OBJECTIVE = Objective(
    name="edm",
    summary="EDM diffusion: preconditioned denoiser, lognormal sigma, EDM weighting",
    loss=edm_loss,
    sampling=SAMPLING,
    reads=("sigma_min", "sigma_max", "rho", "sigma_data", "p_mean", "p_std"),
    meaning_fields=("sigma_data",),
    objective_fields=("p_mean", "p_std"),
)
