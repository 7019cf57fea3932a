"""Consistency-model parameterisation and training losses (CT and iCT).

f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, 0.25 ln t), so f(x, sigma_min) = x
exactly. The losses take the Gaussian noise `z` as an argument: that is what lets
`assignment/` pair it with the images before the step.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm import schedules
from cm.config_view import view
from cm.nets import lpips

PyTree = Any
# apply_fn(params, x_in [B,H,W,C], t_cond [B], labels [B] | None, train, dropout_key) -> [B,H,W,C]
ApplyFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array | None, bool, jax.Array | None],
                   jax.Array]

LOSSES = ("ct", "ict", "edm", "cd", "ddpm")  # edm, ddpm: diffusion (cm/edm.py, cm/ddpm.py)
METRICS = ("l2", "l1", "pseudo_huber", "lpips")


@dataclasses.dataclass(frozen=True)
class CMConfig:
    """The `cm` config section plus the training length and compute dtype it needs.

    Built from the section itself (`from_config`): a field of `cm` missing here, or one
    here missing from `configs/base.py`, is an error naming it.
    """

    loss: str = "ct"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    metric: str = "pseudo_huber"
    huber_c: float = -1.0
    start_scales: int = 2
    end_scales: int = 150
    start_ema: float = 0.9
    p_mean: float = -1.1
    p_std: float = 2.0
    lpips_pool: str = "max"
    lpips_resize: int = 224
    lpips_vgg_path: str = ""  # where the weights are read from (cm.setup.frozen_inputs)
    lpips_lin_path: str = ""
    teacher_workdir: str = ""  # cm.loss=cd (cm.setup.load_teacher)
    num_timesteps: int = 1000  # ddpm: T and the beta schedule (cm/ddpm.py)
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # From outside the `cm` section:
    total_steps: int = 800_000  # training.n_iters, the curricula's length
    lpips_dtype: str = "float32"  # model.dtype, the compute dtype

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"cm.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.metric not in METRICS:
            raise ValueError(f"cm.metric must be one of {METRICS}, got {self.metric!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < cm.sigma_min < cm.sigma_max")
        if self.start_scales < 2 or self.end_scales < self.start_scales:
            raise ValueError("need 2 <= cm.start_scales <= cm.end_scales")
        if self.lpips_pool not in ("max", "avg"):
            raise ValueError(f"cm.lpips_pool must be max or avg, got {self.lpips_pool!r}")
        if self.lpips_resize < 0 or 0 < self.lpips_resize < 16:
            raise ValueError("cm.lpips_resize must be 0 (native size) or at least 16 (VGG16 "
                             f"pools 4 times), got {self.lpips_resize}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "CMConfig":
        return view(cls, config.cm, total_steps=config.training.n_iters,
                    lpips_dtype=config.model.dtype)

    @property
    def uses_lpips(self) -> bool:
        """Whether the loss needs the LPIPS network (EDM's and DDPM's losses are l2)."""
        return self.metric == "lpips" and self.loss not in ("edm", "ddpm")

    @property
    def max_scales(self) -> int:
        return schedules.max_scales(self.end_scales)

    def num_scales(self, step: int | jax.Array) -> jax.Array:
        """N(k) of the curriculum (0 for the diffusion losses EDM and DDPM)."""
        if self.loss in ("edm", "ddpm"):
            return jnp.zeros((), jnp.int32)
        if self.loss == "cd":  # fixed discretisation N = s1 (18 for CIFAR-10 CD)
            return jnp.asarray(self.end_scales, jnp.int32)
        fn = schedules.ict_num_scales if self.loss == "ict" else schedules.ct_num_scales
        return fn(step, self.total_steps, self.start_scales, self.end_scales)

    def target_decay(self, step: int | jax.Array) -> jax.Array:
        """mu(k) of the CT target EMA; 0 for iCT (target = current parameters), EDM, DDPM."""
        if self.loss in ("ict", "edm", "ddpm"):
            return jnp.zeros((), jnp.float32)
        if self.loss == "cd":  # fixed target EMA mu0 (0 for CIFAR-10 CD, configs/cifar10_cd.py)
            return jnp.asarray(self.start_ema, jnp.float32)
        return schedules.ct_ema_decay(self.num_scales(step), self.start_scales, self.start_ema)


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
             lpips_variables: PyTree | None = None, cfg: "CMConfig | None" = None,
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


def sample_levels(cfg: CMConfig, step: jax.Array, keys: jax.Array) -> tuple[jax.Array, ...]:
    """Draws the level index n per example and returns (t_n, t_{n+1}, weight), each [B].

    Args:
      step: the training step k (traced).
      keys: one PRNG key per example `[B]`, so that the draw of an example does not
        depend on how the batch is split across devices.
    """
    n_scales = cfg.num_scales(step)
    sigmas = schedules.karras_sigmas(n_scales, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                     max_n=cfg.max_scales)  # [L]
    if cfg.loss == "ict":
        probs = schedules.lognormal_level_probs(sigmas, n_scales, cfg.p_mean, cfg.p_std)
        logits = jnp.log(jnp.maximum(probs, 1e-30))
        logits = jnp.where(probs > 0, logits, -jnp.inf)
        n = jax.vmap(lambda k: jax.random.categorical(k, logits))(keys)
    else:
        n = jax.vmap(lambda k: jax.random.randint(k, (), 0, n_scales - 1))(keys)
    t_lo, t_hi = sigmas[n], sigmas[n + 1]
    weight = 1.0 / (t_hi - t_lo) if cfg.loss == "ict" else jnp.ones_like(t_lo)
    return t_lo, t_hi, weight


def consistency_loss(apply_fn: ApplyFn, cfg: CMConfig, params: PyTree,
                     target_params: PyTree | None, x: jax.Array, z: jax.Array,
                     step: jax.Array, example_keys: jax.Array, dropout_key: jax.Array,
                     labels: jax.Array | None = None, *, lpips_variables: PyTree | None = None,
                     ) -> tuple[jax.Array, dict]:
    """CT / iCT loss on one shard: d(f(x + t_{n+1} z, t_{n+1}), f_target(x + t_n z, t_n)).

    Args:
      params: online parameters (differentiated).
      target_params: CT's EMA target; ignored by iCT (target = stop_gradient(params)).
      x: images `[B,H,W,C]` in [-1, 1]; z: their (assigned) noise, same shape.
      example_keys: `[B]` keys for the level draws; dropout_key: shared by both passes.
      lpips_variables: the LPIPS weights when `cfg.metric == "lpips"`.

    Returns:
      (mean weighted loss, aux metrics) over this shard.
    """
    t_lo, t_hi, weight = sample_levels(cfg, step, example_keys)
    bcast = lambda t: t[:, None, None, None]
    x_hi = x + bcast(t_hi) * z
    x_lo = x + bcast(t_lo) * z
    online = consistency_fn(apply_fn, params, x_hi, t_hi, cfg, labels, True, dropout_key)
    teacher = params if cfg.loss == "ict" else target_params
    target = consistency_fn(apply_fn, teacher, x_lo, t_lo, cfg, labels, True, dropout_key)
    target = jax.lax.stop_gradient(target)
    d = distance(online, target, cfg.metric, cfg.huber_c, lpips_variables, cfg)
    loss = jnp.mean(weight * d)
    return loss, {"distance": jnp.mean(d)}
