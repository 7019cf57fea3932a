"""What the consistency objectives (CT, iCT, CD) share: the parameterisation, the
distances, the level draws, the loss, and one- and multistep consistency sampling.

f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, 0.25 ln t), so f(x, sigma_min) = x
exactly. The losses take the Gaussian noise `z` as an argument: that is what lets
`assignment/` pair it with the images before the step. Multistep sampling (Song et al.
2023, Algorithm 1): x = f(t_0 z, t_0); then for each later time t:
x <- f(x + sqrt(t^2 - sigma_min^2) z', t). With `sample.clip_denoised` (the default)
each step's x is clipped to [-1, 1] before noise is added again, as the OpenAI PyTorch
sampler does (`karras_sample(clip_denoised=True)`, which clips every denoised output;
their JAX notebook's multistep sampler clips too, with no option); until 2026-12-06 only
the last step was clipped here. One-step sampling is the same either way.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm import schedules
from cm.nets import lpips
from cm.objectives.spec import (
    ApplyFn,
    PyTree,
    SampleOptions,
    Sampler,
    Sampling,
)
from cm.runtime.views import METRICS, CMConfig, ConfigError

# By cm.metric, the fields that define it (a resume must keep them).
METRIC_FIELDS = {"pseudo_huber": ("huber_c",), "lpips": ("lpips_pool", "lpips_resize")}
# The cm fields every consistency objective reads.
READS = ("sigma_min", "sigma_max", "rho", "sigma_data", "metric", "huber_c", "lpips_pool",
         "lpips_resize", "lpips_vgg_path", "lpips_lin_path")
# levels(cfg, step, example_keys [B]) -> (t_n, t_{n+1}, weight), each [B].
LevelsFn = Callable[[CMConfig, jax.Array, jax.Array], tuple[jax.Array, ...]]


def scalings(sigma: jax.Array, sigma_min: float, sigma_data: float):
    """Boundary-condition scalings (c_skip, c_out, c_in) for times `sigma` [B]."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def consistency_fn(apply_fn: ApplyFn, params: PyTree, x: jax.Array, sigma: jax.Array,
                   cfg: CMConfig, labels: jax.Array | None = None, train: bool = False,
                   dropout_key: jax.Array | None = None) -> jax.Array:
    """f_theta(x, sigma) for x [B,H,W,C] and sigma [B]."""
    c_skip, c_out, c_in = (c[:, None, None, None]
                           for c in scalings(sigma, cfg.sigma_min, cfg.sigma_data))
    out = apply_fn(params, c_in * x, 0.25 * jnp.log(sigma), labels, train, dropout_key)
    return c_skip * x + c_out * out


def distance(a: jax.Array, b: jax.Array, metric: str, huber_c: float,
             lpips_variables: PyTree | None = None, cfg: CMConfig | None = None,
             ) -> jax.Array:
    """Per-example distance d(a, b) `[B]`.

    l2 and l1 are means over the pixels (the OpenAI code's convention; a constant
    factor of the squared norm); pseudo_huber is sqrt(||a - b||^2 + c^2) - c; lpips is
    LPIPS-VGG16 (`cm.nets.lpips`) with the weights `lpips_variables` and `cfg`'s pooling,
    resize and compute dtype.
    """
    if metric == "lpips":
        if lpips_variables is None:
            raise ValueError("cm.metric=lpips needs the LPIPS weights (lpips_variables)")

        cfg = cfg or CMConfig()
        return lpips.lpips_distance(lpips_variables, a, b, resize=cfg.lpips_resize or None,
                                    pool=cfg.lpips_pool, dtype=jnp.dtype(cfg.lpips_dtype))
    diff = (a - b).reshape(a.shape[0], -1)
    if metric == "l2":
        return jnp.mean(diff**2, axis=1)
    if metric == "l1":
        return jnp.mean(jnp.abs(diff), axis=1)
    if metric == "pseudo_huber":
        c = huber_c if huber_c >= 0 else 0.00054 * np.sqrt(diff.shape[1])
        return jnp.sqrt(jnp.sum(diff**2, axis=1) + c**2) - c
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def karras_levels(cfg: CMConfig, n_scales: jax.Array) -> jax.Array:
    """The ascending Karras times of N(k) = `n_scales` levels, padded to the static
    `max_scales` length `[L]`."""
    return schedules.karras_sigmas(n_scales, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                   max_n=schedules.max_scales(cfg.end_scales))


def uniform_levels(n_scales: jax.Array, sigmas: jax.Array, keys: jax.Array):
    """n uniform in 0..N-2 per example key; (t_n, t_{n+1}, weight 1), each [B]."""
    n = jax.vmap(lambda k: jax.random.randint(k, (), 0, n_scales - 1))(keys)
    t_lo, t_hi = sigmas[n], sigmas[n + 1]
    return t_lo, t_hi, jnp.ones_like(t_lo)


def consistency_loss(apply_fn: ApplyFn, cfg: CMConfig, params: PyTree,
                     target_params: PyTree | None, x: jax.Array, z: jax.Array,
                     step: jax.Array, example_keys: jax.Array, dropout_key: jax.Array,
                     labels: jax.Array | None = None, *, levels: LevelsFn,
                     online_target: bool, lpips_variables: PyTree | None = None,
                     ) -> tuple[jax.Array, dict]:
    """The consistency-training loss on one shard:
    weight * d(f(x + t_{n+1} z, t_{n+1}), f_target(x + t_n z, t_n)).

    Args:
      params: online parameters (differentiated).
      target_params: the EMA target (CT); unused when `online_target` (iCT: the target
        is stop_gradient(params)).
      x: images `[B,H,W,C]` in [-1, 1]; z: their (assigned) noise, same shape.
      example_keys: `[B]` keys for the level draws; dropout_key: shared by both passes.
      levels: the objective's level draw (`ct.levels`, `ict.levels`).
      lpips_variables: the LPIPS weights when `cfg.metric == "lpips"`.

    Returns:
      (mean weighted loss, aux metrics) over this shard.
    """
    t_lo, t_hi, weight = levels(cfg, step, example_keys)
    bcast = lambda t: t[:, None, None, None]
    x_hi = x + bcast(t_hi) * z
    x_lo = x + bcast(t_lo) * z
    online = consistency_fn(apply_fn, params, x_hi, t_hi, cfg, labels, True, dropout_key)
    teacher = params if online_target else target_params
    target = consistency_fn(apply_fn, teacher, x_lo, t_lo, cfg, labels, True, dropout_key)
    target = jax.lax.stop_gradient(target)
    d = distance(online, target, cfg.metric, cfg.huber_c, lpips_variables, cfg)
    loss = jnp.mean(weight * d)
    return loss, {"distance": jnp.mean(d)}


def sample(apply_fn: ApplyFn, params, cfg: CMConfig, key: jax.Array, shape: tuple[int, ...],
           ts: Sequence[float], labels: jax.Array | None = None,
           clip_denoised: bool = False) -> jax.Array:
    """Draws `shape[0]` samples with the descending times `ts` (jittable); `clip_denoised`
    clips each intermediate x0 to [-1, 1]. The last x0 is returned as it is: the caller
    clips images (`cm.sampling.make_sampler`), never latents."""
    if not ts:
        raise ValueError("sampling needs at least one time")
    if any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"sampling times must be strictly descending, got {tuple(ts)}")
    keys = jax.random.split(key, len(ts))
    b = shape[0]
    x = ts[0] * jax.random.normal(keys[0], shape)
    x = consistency_fn(apply_fn, params, x, jnp.full((b,), ts[0]), cfg, labels)
    for t, k in zip(ts[1:], keys[1:], strict=True):
        if clip_denoised:
            x = jnp.clip(x, -1.0, 1.0)
        noise = jax.random.normal(k, shape)
        x = x + np.sqrt(max(t**2 - cfg.sigma_min**2, 0.0)) * noise
        x = consistency_fn(apply_fn, params, x, jnp.full((b,), t), cfg, labels)
    return x


# Consistency sampler name -> its descending times, from (sigma_max, eval.two_step_t).
NAMED_TIMES: dict[str, Callable[[float, float], tuple[float, ...]]] = {
    "1step": lambda sigma_max, t: (sigma_max,),
    "2step": lambda sigma_max, t: (sigma_max, t),
}


def at_times(ts: Sequence[float], name: str | None = None, clip_denoised: bool = True,
             ) -> Sampler:
    """The consistency sampler with the descending times `ts`."""
    ts = tuple(float(t) for t in ts)
    clip = bool(clip_denoised) if len(ts) > 1 else None  # one step: the same either way

    def sample_fn(apply_fn, params, cfg, key, shape, labels):
        return sample(apply_fn, params, cfg, key, shape, ts, labels, bool(clip))

    tag = f"{len(ts)}step" + ("_noclip" if clip is False else "")
    return Sampler(name or f"{len(ts)}step", ts, len(ts), None, tag, sample_fn, clip)


class ConsistencySampling(Sampling):
    """One- and multistep consistency sampling: `1step`, `2step` for evaluation (times
    from `cm.sigma_max` and `eval.two_step_t`), `sample.ts` for `--mode sample`, one step
    at `cm.sigma_max` for the training grids. The solver fields are not read."""

    kind = "consistency samplers"
    examples = '"1step","2step"'

    def named(self, cfg, name, options: SampleOptions):
        if name not in NAMED_TIMES:
            hint = (" (heunN / eulerN samplers are for EDM runs, ddimN / ddpmN for DDPM "
                    "runs)" if any(c.isdigit() for c in str(name)[1:]) else "")
            raise ConfigError(f"eval.samplers: {name!r} is not a consistency sampler; "
                              f"expected names from {sorted(NAMED_TIMES)}{hint}")
        return at_times(NAMED_TIMES[name](cfg.sigma_max, options.two_step_t), name,
                        options.clip_denoised)

    def for_grid(self, cfg, s):
        return at_times((cfg.sigma_max,))

    def for_sample_mode(self, cfg, s):
        return at_times(s.ts, clip_denoised=s.clip_denoised)

    def usable(self, field, value):
        if field == "eval.samplers":
            return bool(value) and all(n in NAMED_TIMES for n in value)
        return False  # the solver fields mean nothing here

    def default(self, field, s, cfg):
        return ("1step", "2step") if field == "eval.samplers" else None


SAMPLING = ConsistencySampling()
