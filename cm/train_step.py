"""The pure training step `(state, batch) -> (state, metrics)` over a ('data',) mesh.

Each device gets one shard of the global batch (`jax.shard_map`) and computes the
objective's loss on it (looked up once, from its spec); the gradient is that of the
mean loss over the `data` axis (averaged exactly once, see `shard_loss`). The
optimiser, the target EMA (objectives that keep one) and the evaluation EMAs are
updated once, replicated.
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
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cm import pairing
from cm.objectives import Objective
from cm.objectives.spec import ApplyFn
from cm.runtime.views import CMConfig

PyTree = Any
# Keys of the step's `frozen` argument -> the loss functions' keyword arguments.
FROZEN_ARGS = {"teacher": "teacher_params", "lpips": "lpips_variables"}
# device_assign(x [b,H,W,C], z [b,H,W,C], key) -> z, applied to each device's shard.
DeviceAssignFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    target_params: PyTree | None  # the objective's target network; None without one
    ema_params: tuple  # one copy per rate in training.ema_rates
    opt_state: PyTree


def init_state(params: PyTree, tx: optax.GradientTransformation, keeps_target: bool,
               num_ema: int) -> TrainState:
    """Step 0: `params`, a copy as the target network when the objective keeps one
    (`Objective.keeps_target`), `num_ema` copies as the evaluation EMAs."""
    copy = lambda p: jax.tree.map(jnp.array, p)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=copy(params) if keeps_target else None,
        ema_params=tuple(copy(params) for _ in range(num_ema)),
        opt_state=tx.init(params),
    )


def apply_updates(state: TrainState, grads: PyTree, tx: optax.GradientTransformation,
                  cfg: CMConfig, objective: Objective, ema_rates: tuple[float, ...],
                  ) -> tuple[TrainState, jax.Array]:
    """The optimiser step and the target / evaluation EMAs; (new state, target decay mu).

    Every update is elementwise per parameter leaf, so XLA fuses each leaf's optimiser
    and EMA arithmetic inside the jitted step (`bench/train_step.py` times this part
    alone against the whole step).
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    mu = objective.target_decay(cfg, state.step)
    target = state.target_params
    if target is not None:
        target = jax.tree.map(lambda t, p: mu * t + (1.0 - mu) * p, target, params)
    emas = tuple(
        jax.tree.map(lambda e, p, r=rate: r * e + (1.0 - r) * p, ema, params)
        for ema, rate in zip(state.ema_params, ema_rates, strict=True))
    new_state = state.replace(step=state.step + 1, params=params, target_params=target,
                              ema_params=emas, opt_state=opt_state)
    return new_state, mu


def make_train_step(apply_fn: ApplyFn, cfg: CMConfig, objective: Objective,
                    tx: optax.GradientTransformation, ema_rates: tuple[float, ...],
                    mesh: Mesh, device_assign: DeviceAssignFn | None = None,
                    teacher_apply_fn=None, steps_per_call: int = 1, microbatches: int = 1):
    """Returns the jitted `train_step(state, batch, frozen) -> (state, metrics)`.

    With `microbatches = m > 1` (gradient accumulation, `training.microbatch`) each
    device's shard of the (already paired) batch is cut into m contiguous parts, whose
    gradients are computed one after the other (`lax.scan`: one part's activations live
    at a time) and averaged before the one optimiser step; the EMAs, the target and the
    curriculum advance once. Per-example randomness is keyed by the global row, so the
    update is that of m = 1 up to float rounding; dropout draws a key per part.

    `batch` holds `x` and `z` `[B,H,W,C]` sharded over the mesh's `data` axis (and
    optionally `label` `[B]`). The state is donated. With `steps_per_call = k > 1` the
    function takes a tuple of k such batches and runs the k steps in one call (unrolled,
    with an optimisation barrier between steps, so each step is the one-step program),
    so small models pay the host's per-call cost once per k steps; its metrics are the
    last step's, plus `losses` `[k]`. With `device_assign` (assignment.where=device) the
    metrics hold the pairing's `distance_before`, `distance_after` and `reduction`.

    `frozen` holds replicated inputs that are never trained nor checkpointed (see
    `cm.setup.frozen_inputs`): `step_key` (always: the base key of the step's randomness,
    `fold_in(step_key, step)`), `teacher` (a teacher's parameters, for an objective that
    needs one, applied with `teacher_apply_fn`) and `lpips` (the LPIPS weights for
    `cm.metric=lpips`). They are arguments rather than constants captured by the jitted
    function, so they are not baked into the program: runs that differ only in
    `training.seed` share one compiled step (and the persistent compilation cache serves
    a seed sweep from its first run's compile).
    """
    loss_impl = objective.loss
    if objective.needs_teacher:
        if teacher_apply_fn is None:
            raise ValueError(f"cm.loss={objective.name} needs teacher_apply_fn")
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
        if microbatches > 1:
            return _accumulate(params, target_params, step, batch, example_keys,
                               dropout_key, extra)

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

    def _accumulate(params, target_params, step, batch, example_keys, dropout_key, extra):
        m = microbatches
        local_b = batch["x"].shape[0]
        if local_b % m:
            raise ValueError(f"a device's {local_b} rows do not split into {m} microbatches")
        parts = jax.tree.map(lambda a: a.reshape((m, local_b // m) + a.shape[1:]),
                             {**batch, "keys": example_keys})

        def loss_fn(p, part, i):
            loss, aux = loss_impl(apply_fn, cfg, p, target_params, part["x"], part["z"], step,
                                  part["keys"], jax.random.fold_in(dropout_key, i),
                                  part.get("label"), **extra)
            # The mean gradient over devices, as above; the metrics averaged here too, so
            # that everything the scan carries is the same on every device.
            return jax.lax.pmean(loss, "data"), jax.lax.pmean(aux, "data")

        def body(carry, xs):
            part, i = xs
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, part, i)
            return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

        zeros = jax.eval_shape(lambda: jax.value_and_grad(loss_fn, has_aux=True)(
            params, jax.tree.map(lambda a: a[0], parts), 0))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (loss, aux), grads = zeros
        (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads),
                                             (parts, jnp.arange(m)))
        mean = lambda t: jax.tree.map(lambda a: a / m, t)  # noqa: E731
        return mean(loss), mean(aux), mean(grads)

    def assign_shard(x, z, step, step_key):
        shard = jax.lax.axis_index("data")
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(step_key, step), 1),
                                 shard)
        paired = device_assign(x, z, key)
        stats = pairing.device_diagnostics(x, z, paired)
        return paired, stats["distance_before"], stats["distance_after"]

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
        new_state, mu = apply_updates(state, grads, tx, cfg, objective, ema_rates)
        metrics = {
            "loss": loss,
            "distance": aux["distance"],
            "num_scales": objective.num_scales(cfg, state.step),
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
