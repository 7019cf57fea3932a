"""The pure training step `(state, batch) -> (state, metrics)` over a ('data',) mesh.

Each device gets one shard of the global batch (`jax.shard_map`), computes the
consistency loss on it; the gradient is that of the mean loss over the `data` axis
(averaged exactly once, see `shard_loss`). The optimiser, the CT target EMA and the
evaluation EMAs are updated once, replicated.
Randomness comes from `fold_in(step_key, step)`, the key an argument of the step (not a
constant of the program); per-example keys are folded with the
global example index so the update does not depend on the number of devices.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cm import consistency, losses

PyTree = Any
# Keys of the step's `frozen` argument -> the loss functions' keyword arguments.
FROZEN_ARGS = {"teacher": "teacher_params", "lpips": "lpips_variables"}
# device_assign(x [b,H,W,C], z [b,H,W,C], key) -> z, applied to each device's shard.
DeviceAssignFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    target_params: PyTree | None  # CT's EMA teacher; None for iCT
    ema_params: tuple  # one copy per rate in training.ema_rates
    opt_state: PyTree


def make_mesh(devices: list | None = None) -> Mesh:
    """The 1-D ('data',) mesh over `devices` (default: every device of every process).

    Devices are grouped by process (stable within a process), so that each process's
    devices hold one contiguous block of the global batch: the rows its `Batcher`
    slice and `shard_batch` put there.
    """
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: d.process_index)
    return Mesh(devices, ("data",))


def ema_rates(training: ml_collections.ConfigDict) -> tuple[float, ...]:
    """The per-step rates of the evaluation EMAs.

    `training.ema_rates` as given, except that `training.ema_halflife_kimg > 0` sets the
    first rate the EDM way, from a half-life in images and the global batch:
    rate = 0.5 ** (batch / (1000 * halflife_kimg)); 500 kimg at batch 512 is 0.99929.
    """
    rates = tuple(float(r) for r in training.ema_rates)
    if training.ema_halflife_kimg > 0:
        rate = 0.5 ** (training.batch_size / (1000.0 * training.ema_halflife_kimg))
        rates = (rate,) + rates[1:]
    return rates


DECAYS = ("none", "cosine", "linear")


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int = 0):
    """The learning rate: `optim.lr` after a linear warmup of `optim.warmup` steps, then
    constant (`optim.decay=none`) or falling to `optim.final_lr * optim.lr` at step
    `total_steps` along a half cosine or a straight line (and constant after it).

    Returns a float (constant, no warmup) or an optax schedule of the step.
    """
    decay = optim.get("decay", "none")
    if decay not in DECAYS:
        raise ValueError(f"optim.decay must be one of {DECAYS}, got {decay!r}")
    if decay == "none":
        return optax.linear_schedule(0.0, optim.lr, optim.warmup) if optim.warmup > 0 \
            else optim.lr
    if total_steps <= optim.warmup:
        raise ValueError(f"optim.decay={decay} needs more training steps ({total_steps}) "
                         f"than optim.warmup ({optim.warmup})")
    end = optim.lr * optim.get("final_lr", 0.0)
    n = total_steps - optim.warmup
    tail = (optax.cosine_decay_schedule(optim.lr, n, alpha=end / optim.lr) if decay == "cosine"
            else optax.linear_schedule(optim.lr, end, n))
    if optim.warmup == 0:
        return tail
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup), tail], [optim.warmup])


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int = 0) -> optax.GradientTransformation:
    """RAdam or Adam with the `learning_rate` schedule (warmup, decay over `total_steps`,
    the run's `training.n_iters`) and optional global-norm clipping."""
    lr = learning_rate(optim, total_steps)
    makers = {"adam": optax.adam, "radam": optax.radam}
    if optim.optimizer not in makers:
        raise ValueError(f"unknown optim.optimizer {optim.optimizer!r}; "
                         f"expected one of {sorted(makers)}")
    chain = []
    if optim.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    chain.append(makers[optim.optimizer](lr, b1=optim.beta1, b2=optim.beta2, eps=optim.eps))
    if optim.weight_decay > 0:
        chain.append(optax.add_decayed_weights(-optim.weight_decay * optim.lr))
    return optax.chain(*chain)


def init_state(params: PyTree, tx: optax.GradientTransformation, loss: str,
               num_ema: int) -> TrainState:
    copy = lambda p: jax.tree.map(jnp.array, p)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=copy(params) if loss in ("ct", "cd") else None,
        ema_params=tuple(copy(params) for _ in range(num_ema)),
        opt_state=tx.init(params),
    )


def apply_updates(state: TrainState, grads: PyTree, tx: optax.GradientTransformation,
                  cfg: consistency.CMConfig, ema_rates: tuple[float, ...],
                  ) -> tuple[TrainState, jax.Array]:
    """The optimiser step and the target / evaluation EMAs; (new state, target decay mu).

    Every update is elementwise per parameter leaf, so XLA fuses each leaf's optimiser
    and EMA arithmetic inside the jitted step (`bench/train_step.py` times this part
    alone against the whole step).
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    mu = cfg.target_decay(state.step)
    target = state.target_params
    if target is not None:
        target = jax.tree.map(lambda t, p: mu * t + (1.0 - mu) * p, target, params)
    emas = tuple(
        jax.tree.map(lambda e, p, r=rate: r * e + (1.0 - r) * p, ema, params)
        for ema, rate in zip(state.ema_params, ema_rates, strict=True))
    new_state = state.replace(step=state.step + 1, params=params, target_params=target,
                              ema_params=emas, opt_state=opt_state)
    return new_state, mu


def mean_distance(x: jax.Array, z: jax.Array) -> jax.Array:
    """The mean over the global batch of the row-wise L2 distances |x_i - z_i| in float32
    (`assignment.pair_distances`' quantity), from inside a shard_map over `data`."""
    d = (x.astype(jnp.float32) - z.astype(jnp.float32)).reshape(x.shape[0], -1)
    return jax.lax.pmean(jnp.mean(jnp.sqrt(jnp.sum(d * d, axis=1))), "data")


def make_train_step(apply_fn: consistency.ApplyFn, cfg: consistency.CMConfig,
                    tx: optax.GradientTransformation, ema_rates: tuple[float, ...],
                    mesh: Mesh, device_assign: DeviceAssignFn | None = None,
                    teacher_apply_fn=None, steps_per_call: int = 1):
    """Returns the jitted `train_step(state, batch, frozen) -> (state, metrics)`.

    `batch` holds `x` and `z` `[B,H,W,C]` sharded over the mesh's `data` axis (and
    optionally `label` `[B]`). The state is donated. With `steps_per_call = k > 1` the
    function takes a tuple of k such batches and runs the k steps in one call (unrolled,
    with an optimisation barrier between steps, so each step is the one-step program),
    so small models pay the host's per-call cost once per k steps; its metrics are the
    last step's, plus `losses` `[k]`. With `device_assign` (assignment.where=device) the
    metrics hold the pairing's `distance_before`, `distance_after` and `reduction`.

    `frozen` holds replicated inputs that are never trained nor checkpointed (see
    `cm.setup.frozen_inputs`): `step_key` (always: the base key of the step's randomness,
    `fold_in(step_key, step)`), `teacher` (the EDM teacher's parameters for `cm.loss=cd`,
    applied with `teacher_apply_fn`) and `lpips` (the LPIPS weights for
    `cm.metric=lpips`). They are arguments rather than constants captured by the jitted
    function, so they are not baked into the program: runs that differ only in
    `training.seed` share one compiled step (and the persistent compilation cache serves
    a seed sweep from its first run's compile).
    """
    loss_impl = losses.LOSS_FNS[cfg.loss]
    if cfg.loss == "cd":
        if teacher_apply_fn is None:
            raise ValueError("consistency distillation needs teacher_apply_fn")
        loss_impl = functools.partial(loss_impl, teacher_apply_fn=teacher_apply_fn)

    def shard_loss(params, target_params, step, batch, frozen):
        x, z = batch["x"], batch["z"]
        local_b = x.shape[0]
        shard = jax.lax.axis_index("data")
        key = jax.random.fold_in(frozen["step_key"], step)
        idx = shard * local_b + jnp.arange(local_b)
        example_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
        dropout_key = jax.random.fold_in(jax.random.fold_in(key, 2), shard)

        extra = {name: frozen[key] for key, name in FROZEN_ARGS.items() if key in frozen}

        def loss_fn(p):
            # The global loss is the mean over devices of the shard losses (equal shard
            # sizes). Differentiating it directly gives the mean gradient: the
            # parameters are replicated (device-invariant) inputs of shard_map, so
            # autodiff already sums their per-device cotangents (the transpose of the
            # implicit broadcast is a psum). A pmean of the gradients after a
            # per-shard grad would change nothing and leave a D-times-too-large sum.
            loss, aux = loss_impl(apply_fn, cfg, p, target_params, x, z, step, example_keys,
                                  dropout_key, batch.get("label"), **extra)
            return jax.lax.pmean(loss, "data"), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        aux = jax.lax.pmean(aux, "data")
        return loss, aux, grads

    def assign_shard(x, z, step, step_key):
        shard = jax.lax.axis_index("data")
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(step_key, step), 1),
                                 shard)
        paired = device_assign(x, z, key)
        return paired, mean_distance(x, z), mean_distance(x, paired)

    def train_step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
        if device_assign is not None:
            # Each device pairs its own shard, in a shard_map of its own: optax's Hungarian
            # loop starts from constants that its body makes per-device values, which the
            # varying-axes check refuses (a TypeError). Nothing is differentiated here, so
            # the check that the loss's shard_map needs for its gradients can be off.
            z, before, after = jax.shard_map(
                assign_shard, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                out_specs=(P("data"), P(), P()), check_vma=False,
            )(batch["x"], batch["z"], state.step, frozen["step_key"])
            batch = {**batch, "z": z}
        batch_specs = {k: P("data") for k in batch}
        loss, aux, grads = jax.shard_map(
            shard_loss, mesh=mesh,
            in_specs=(P(), P(), P(), batch_specs, P()),
            out_specs=(P(), P(), P()),
        )(state.params, state.target_params, state.step, batch, frozen)
        new_state, mu = apply_updates(state, grads, tx, cfg, ema_rates)
        metrics = {
            "loss": loss,
            "distance": aux["distance"],
            "num_scales": cfg.num_scales(state.step),
            "mu": mu,
            "grad_norm": optax.global_norm(grads),
        }
        if device_assign is not None:  # what the host reports for its own pairing
            metrics.update(distance_before=before, distance_after=after,
                           reduction=1.0 - after / before)
        return new_state, metrics

    def train_steps(state: TrainState, batches: tuple[dict, ...], frozen: dict,
                    ) -> tuple[TrainState, dict]:
        losses = []
        for batch in batches:  # unrolled: k copies of the one-step program
            state, metrics = train_step(state, batch, frozen)
            # No fusion across step boundaries: each step computes what it computes
            # alone (bitwise on the CPU, tests/test_train.py).
            state, metrics = jax.lax.optimization_barrier((state, metrics))
            losses.append(metrics["loss"])
        return state, {**metrics, "losses": jnp.stack(losses)}

    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
    fn = train_step if steps_per_call == 1 else train_steps
    replicated = NamedSharding(mesh, P())
    return jax.jit(fn, donate_argnums=(0,), out_shardings=(replicated, replicated))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's host batch onto the mesh, split along the batch axis.

    With several processes, each passes its own `[B_host, ...]` rows; the result is
    the global `[B_host * process_count, ...]` array, process p's rows at
    `[p * B_host, (p + 1) * B_host)` (the mesh groups devices by process).
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
