"""The optimiser and its learning-rate schedule, from the `optim` section.

RAdam or Adam (optax) after optional global-norm clipping, with a linear warmup and an
optional decay to `optim.final_lr * optim.lr` at `training.n_iters`.
"""

from typing import Any

import optax

from cm.runtime.views import DECAYS, OPTIMIZERS, ConfigError


def learning_rate(optim: Any, total_steps: int = 0):
    """The learning rate: `optim.lr` after a linear warmup of `optim.warmup` steps, then
    constant (`optim.decay=none`) or falling to `optim.final_lr * optim.lr` at step
    `total_steps` along a half cosine or a straight line (and constant after it).

    Args:
      optim: the `optim` section (a view, a `ConfigDict` or any mapping with `lr`,
        `warmup`, and optionally `decay` and `final_lr`).
      total_steps: the run's `training.n_iters` (the decay's end).

    Returns a float (constant, no warmup) or an optax schedule of the step.
    """
    decay = optim.get("decay", "none")
    if decay not in DECAYS:
        raise ConfigError(f"optim.decay must be one of {DECAYS}, got {decay!r}")
    if decay == "none":
        return optax.linear_schedule(0.0, optim.lr, optim.warmup) if optim.warmup > 0 \
            else optim.lr
    if total_steps <= optim.warmup:
        raise ConfigError(f"optim.decay={decay} needs more training steps ({total_steps}) "
                          f"than optim.warmup ({optim.warmup})")
    end = optim.lr * optim.get("final_lr", 0.0)
    n = total_steps - optim.warmup
    tail = (optax.cosine_decay_schedule(optim.lr, n, alpha=end / optim.lr) if decay == "cosine"
            else optax.linear_schedule(optim.lr, end, n))
    if optim.warmup == 0:
        return tail
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup), tail], [optim.warmup])


def lr_at(optim: Any, total_steps: int, step: int) -> float:
    """The learning rate at `step` (a float, whether the schedule is constant or not)."""
    lr = learning_rate(optim, total_steps)
    return float(lr(step)) if callable(lr) else float(lr)


def make_optimizer(optim: Any, total_steps: int = 0) -> optax.GradientTransformation:
    """RAdam or Adam with the `learning_rate` schedule (warmup, decay over `total_steps`,
    the run's `training.n_iters`) and optional global-norm clipping."""
    lr = learning_rate(optim, total_steps)
    makers = {"adam": optax.adam, "radam": optax.radam}
    assert set(makers) == set(OPTIMIZERS)
    if optim.optimizer not in makers:
        raise ConfigError(f"unknown optim.optimizer {optim.optimizer!r}; "
                          f"expected one of {sorted(makers)}")
    chain = []
    if optim.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    chain.append(makers[optim.optimizer](lr, b1=optim.beta1, b2=optim.beta2, eps=optim.eps))
    if optim.weight_decay > 0:
        chain.append(optax.add_decayed_weights(-optim.weight_decay * optim.lr))
    return optax.chain(*chain)
