"""DDPM training (Ho et al. 2020) and its samplers: DDIM (Song et al. 2021) and ancestral.

Discrete timesteps t = 0..T-1 (the papers' 1..T), `alpha_bar_t = prod_{s<=t} (1 - beta_s)`,
`x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`; the network predicts eps from
(x_t, t), with t the integer timestep fed to its sinusoidal embedding as is. The loss is
the simple MSE on eps with t uniform, and eps is the noise `z` given as an argument: the
assignment stage pairs it with the images before the step, exactly as for consistency
training. Samplers: DDIM `ddimS` (eta, uniform or quadratic timesteps) and ancestral
`ddpmS`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cm.objectives.spec import ApplyFn, Objective, PyTree, Solver, SolverSampling
from cm.runtime.views import CMConfig, ConfigError

BETA_SCHEDULES = ("linear", "cosine")
SKIPS = ("uniform", "quadratic")  # DDIM's sub-sequences of timesteps
COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal (2021), eq. 17
MAX_BETA = 0.999  # their clip of the cosine schedule's last betas


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """The discrete noise schedule, float64 numpy arrays of length T, index t = 0..T-1.

    Attributes:
      betas: beta_t.
      alphas_cumprod: alpha_bar_t = prod_{s<=t} (1 - beta_s).
      alphas_cumprod_prev: alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
    """

    betas: np.ndarray

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or len(b) < 1 or not np.all((b > 0) & (b < 1)):
            raise ValueError("betas must be a non-empty vector in (0, 1)")

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def posterior_variance(self) -> np.ndarray:
        """Var q(x_{t-1} | x_t, x_0) = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)."""
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        return self.betas * (1.0 - a_prev) / (1.0 - a)

    @property
    def posterior_mean_coefs(self) -> tuple[np.ndarray, np.ndarray]:
        """(c0, ct) with E q(x_{t-1} | x_t, x_0) = c0 x_0 + ct x_t."""
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        c0 = self.betas * np.sqrt(a_prev) / (1.0 - a)
        ct = np.sqrt(1.0 - self.betas) * (1.0 - a_prev) / (1.0 - a)
        return c0, ct

    def respaced(self, seq: np.ndarray) -> "Schedule":
        """The schedule on the ascending sub-sequence `seq` of timesteps: alpha_bar kept at
        those steps, beta'_i = 1 - alpha_bar_{seq_i} / alpha_bar_{seq_{i-1}} (Nichol &
        Dhariwal 2021, sec. 4); `seq = arange(T)` gives this schedule back."""
        a = self.alphas_cumprod[np.asarray(seq)]
        return Schedule(1.0 - a / np.append(1.0, a[:-1]))


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
    """beta_t, t = 0..T-1, float64.

    `linear`: evenly spaced from `beta_start` to `beta_end` (Ho et al., T = 1000, 1e-4 to
    0.02). `cosine` (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2(pi/2 (t/T + s) / (1 + s)), s = 0.008, and beta_t = 1 - alpha_bar(t+1) /
    alpha_bar(t) clipped at 0.999; `beta_start` and `beta_end` are unused.
    """
    if num_timesteps < 1:
        raise ValueError(f"cm.num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < cm.beta_start <= cm.beta_end < 1, got {beta_start}, "
                             f"{beta_end}")
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        s = COSINE_OFFSET
        f = np.cos((np.arange(num_timesteps + 1) / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
    raise ValueError(f"cm.beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


def schedule_of(cfg: CMConfig) -> Schedule:
    """The schedule of `cm.num_timesteps`, `cm.beta_schedule`, `cm.beta_start`, `cm.beta_end`."""
    return Schedule(make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start,
                               cfg.beta_end))


def ddpm_loss(apply_fn: ApplyFn, cfg: CMConfig, params: PyTree,
              target_params: PyTree | None, x: jax.Array, z: jax.Array, step: jax.Array,
              example_keys: jax.Array, dropout_key: jax.Array,
              labels: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """DDPM's simple loss on one shard: mean over examples of mean_pixels (eps_theta - z)^2.

    The objective table's loss signature (`target_params` and `step` are unused). One
    t uniform in 0..T-1 per example, drawn from its key in `example_keys` (so the draw does
    not depend on how the batch is split over devices); `z` `[B,H,W,C]` is eps, as paired
    with the images `x` by the assignment stage.
    """
    del target_params, step
    ab = schedule_of(cfg).alphas_cumprod
    # sqrt(1 - alpha_bar) from float64: 1 - alpha_bar_0 = 1e-4 loses digits in float32.
    sqrt_a, sqrt_1ma = (jnp.asarray(v, jnp.float32) for v in (np.sqrt(ab), np.sqrt(1.0 - ab)))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, cfg.num_timesteps))(example_keys)
    b = lambda v: v[t][:, None, None, None]  # noqa: E731  [B,1,1,1]
    x_t = b(sqrt_a) * x + b(sqrt_1ma) * z
    eps = apply_fn(params, x_t, t.astype(jnp.float32), labels, True, dropout_key)
    err = jnp.mean(((eps - z) ** 2).reshape(x.shape[0], -1), axis=1)  # [B]
    loss = jnp.mean(err)
    return loss, {"distance": loss}


def timesteps(num_timesteps: int, steps: int, skip: str = "uniform") -> np.ndarray:
    """The ascending sub-sequence tau of `steps` distinct timesteps a sampler visits.

    `uniform`: tau_i = floor(i T / S), i = 0..S-1, which is DDIM's `range(0, T, T // S)`
    when S divides T (S = 10, T = 1000: 0, 100, ..., 900) and all of 0..T-1 when S = T.
    `quadratic`: DDIM's floor((i sqrt(0.8 T) / (S - 1))^2); where that repeats a
    timestep (small i, large S) the later one is moved up to the next free timestep, so
    that the S steps stay distinct.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, T={num_timesteps}], got {steps}")
    if skip == "uniform":
        return (np.arange(steps, dtype=np.int64) * num_timesteps) // steps
    if skip == "quadratic":
        raw = (np.linspace(0.0, np.sqrt(0.8 * num_timesteps), steps) ** 2).astype(np.int64)
        seq = raw.copy()
        for i in range(1, steps):
            seq[i] = max(raw[i], seq[i - 1] + 1)
        return seq
    raise ValueError(f"sampling skip must be one of {SKIPS}, got {skip!r}")


def _predict(apply_fn, params, x, t, sqrt_a, sqrt_1ma, labels, clip_denoised):
    """(x0_hat, eps_hat) at timestep `t` with sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)."""
    eps = apply_fn(params, x, jnp.full((x.shape[0],), t, jnp.float32), labels, False, None)
    x0 = (x - sqrt_1ma * eps) / sqrt_a
    if clip_denoised:  # and the eps consistent with the clipped x0
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - sqrt_a * x0) / sqrt_1ma
    return x0, eps


def _descending(*rows: np.ndarray) -> jax.Array:
    """Per-step constants `[K, S]` (float64 -> float32), in the order the loop visits them."""
    return jnp.asarray(np.stack(rows)[:, ::-1], jnp.float32)


def ddim_loop(apply_fn: ApplyFn, params: PyTree, cfg: CMConfig,
              x: jax.Array, key: jax.Array, steps: int, eta: float = 0.0,
              skip: str = "uniform", labels: jax.Array | None = None,
              clip_denoised: bool = True) -> jax.Array:
    """DDIM from x = x_{tau_S} (`[B,H,W,C]`) down to x_0 on the sub-sequence tau.

    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev); the last step goes to
    a_prev = 1 (x0_hat). eta = 0 is deterministic; eta = 1 on all T steps is DDPM's
    ancestral sampling with the posterior variance. `clip_denoised` clips x0_hat to
    [-1, 1] (and re-derives eps_hat from it), as ddpm-torch's samplers do. `key` draws
    the fresh noise z (unused when eta = 0).
    """
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    seq = timesteps(cfg.num_timesteps, steps, skip)
    ab = schedule_of(cfg).alphas_cumprod
    a = ab[seq]
    a_prev = np.append(1.0, a[:-1])
    sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
    c_eps = np.sqrt(np.maximum(1.0 - a_prev - sigma**2, 0.0))
    # Descending, as the loop visits them.
    table = _descending(seq, np.sqrt(a), np.sqrt(1.0 - a), np.sqrt(a_prev), c_eps, sigma)

    def body(i, x):
        t, sqrt_a, sqrt_1ma, sqrt_a_prev, c, sg = table[:, i]
        x0, eps = _predict(apply_fn, params, x, t, sqrt_a, sqrt_1ma, labels, clip_denoised)
        x = sqrt_a_prev * x0 + c * eps
        if eta > 0:
            x = x + sg * jax.random.normal(jax.random.fold_in(key, i), x.shape)
        return x

    return jax.lax.fori_loop(0, steps, body, x)


def ancestral_loop(apply_fn: ApplyFn, params: PyTree, cfg: CMConfig,
                   x: jax.Array, key: jax.Array, steps: int, skip: str = "uniform",
                   labels: jax.Array | None = None, clip_denoised: bool = True) -> jax.Array:
    """DDPM ancestral sampling (Ho et al., Algorithm 2) from x = x_{tau_S} down to x_0.

    x_prev = c0 x0_hat + ct x + sigma z with the posterior mean coefficients and
    sigma^2 = beta (DDPM's `fixedlarge`, its CIFAR-10 choice, also ddpm-torch's); no noise
    on the last step. With S = T this is DDPM exactly; with S < T the betas are those of
    the sub-sequence, beta' = 1 - a / a_prev (respacing). x0_hat is clipped to [-1, 1]
    when `clip_denoised` (DDPM's and ddpm-torch's default).
    """
    seq = timesteps(cfg.num_timesteps, steps, skip)
    schedule = schedule_of(cfg)
    sub = schedule.respaced(seq)
    a = schedule.alphas_cumprod[seq]
    c0, ct = sub.posterior_mean_coefs
    sigma = np.where(np.arange(steps) > 0, np.sqrt(sub.betas), 0.0)
    table = _descending(seq, np.sqrt(a), np.sqrt(1.0 - a), c0, ct, sigma)

    def body(i, x):
        t, sqrt_a, sqrt_1ma, c0_i, ct_i, sg = table[:, i]
        x0, _ = _predict(apply_fn, params, x, t, sqrt_a, sqrt_1ma, labels, clip_denoised)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape)
        return c0_i * x0 + ct_i * x + sg * noise

    return jax.lax.fori_loop(0, steps, body, x)


def ddim_sample(apply_fn: ApplyFn, params: PyTree, cfg: CMConfig,
                key: jax.Array, shape: tuple[int, ...], steps: int, eta: float = 0.0,
                skip: str = "uniform", labels: jax.Array | None = None,
                clip_denoised: bool = True) -> jax.Array:
    """`shape[0]` DDIM samples from x_T ~ N(0, I) (jittable), not clipped: the caller
    clips images to [-1, 1] (`cm.sampling.make_sampler`); latents are not clipped."""
    x_key, key = jax.random.split(key)
    return ddim_loop(apply_fn, params, cfg, jax.random.normal(x_key, shape), key, steps, eta,
                     skip, labels, clip_denoised)


def ancestral_sample(apply_fn: ApplyFn, params: PyTree,
                     cfg: CMConfig, key: jax.Array, shape: tuple[int, ...],
                     steps: int, skip: str = "uniform", labels: jax.Array | None = None,
                     clip_denoised: bool = True) -> jax.Array:
    """`shape[0]` DDPM ancestral samples from x_T ~ N(0, I) (jittable), not clipped (as
    `ddim_sample`)."""
    x_key, key = jax.random.split(key)
    return ancestral_loop(apply_fn, params, cfg, jax.random.normal(x_key, shape), key, steps,
                          skip, labels, clip_denoised)


def _timesteps(cfg: CMConfig, steps: int, options) -> np.ndarray:
    return timesteps(cfg.num_timesteps, steps, options.skip)[::-1].astype(np.float64)


def _check(cfg: CMConfig, steps: int, options) -> None:
    schedule_of(cfg)  # raises on a bad schedule
    timesteps(cfg.num_timesteps, steps, options.skip)  # steps <= T, skip known
    if not 0.0 <= options.eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {options.eta}")


def _ddim(apply_fn, params, cfg, key, shape, labels, steps, options):
    return ddim_sample(apply_fn, params, cfg, key, shape, steps, options.eta, options.skip,
                       labels, options.clip_denoised)


def _ancestral(apply_fn, params, cfg, key, shape, labels, steps, options):
    return ancestral_sample(apply_fn, params, cfg, key, shape, steps, options.skip, labels,
                            options.clip_denoised)


def _tag(name: str, steps: int, options) -> str:
    tag = f"{name}{steps}"
    if name == "ddim" and options.eta:
        tag += f"_eta{options.eta:g}"
    return tag + (f"_{options.skip}" if options.skip != "uniform" else "")


SAMPLING = SolverSampling(
    {"ddim": Solver(lambda s: s, _timesteps, _ddim, _check, reads_eta=True, tag=_tag,
                   reads_clip=True),
     "ddpm": Solver(lambda s: s, _timesteps, _ancestral, _check, tag=_tag, reads_clip=True)},
    default_solver="ddim", default_steps=50, kind="DDIM or ancestral samplers",
    examples='"ddim50","ddpm1000"', config_file="configs/cifar10_ddpm.py",
    max_steps=lambda cfg: cfg.num_timesteps)


def _check_schedule(cfg: CMConfig) -> None:
    try:
        schedule_of(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e


OBJECTIVE = Objective(
    name="ddpm",
    summary="DDPM: eps prediction on T discrete timesteps, simple MSE loss",
    loss=ddpm_loss,
    sampling=SAMPLING,
    reads=("num_timesteps", "beta_schedule", "beta_start", "beta_end"),
    meaning_fields=("num_timesteps", "beta_schedule", "beta_start", "beta_end"),
    check=_check_schedule,
)
