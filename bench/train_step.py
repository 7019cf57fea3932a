"""Times the jitted training step of a config on whatever backend is present.

  python -m bench.train_step --config configs/cifar10_ct.py --steps 50
  python -m bench.train_step --config configs/quickstart.py --config.training.batch_size=128
  python -m bench.train_step --config configs/cifar10_cd.py   # CD: a random teacher
  python -m bench.train_step --config configs/cifar10_ct.py --config.cm.metric=pseudo_huber

Prints steps/s and images/s after compilation (median of timed windows), the model
FLOPs per step from XLA's cost analysis, and, on a GPU whose peak is known, the
fraction of peak reached. Data and noise are random arrays already on the device,
so this measures the step alone (the input pipeline is measured by
bench/train_throughput.py). The step is the one `cm.train` builds (same `Setup`, same
keys), so a persistent compilation cache shares it with the throughput benchmark.

Where the step's time goes: the host time of one step call (argument handling and
dispatch of the ~2,200-buffer state; JAX dispatches asynchronously, so it is hidden
while it is shorter than the step), and with `--breakdown` (on by default) the
optimiser + EMA update alone (`train_step.apply_updates`, jitted on its own over the
real parameter tree, called back to back like training does, with its own host time
per call), and one host-to-device copy of a global batch (what the input thread
overlaps with the step), each as a fraction of the step.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cm import nets, train_step
from cm.runtime import distributed
from cm.setup import Setup

config_flags.DEFINE_config_file("config", "configs/cifar10_ct.py", "Config file.",
                                lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed steps per window.")
flags.DEFINE_integer("windows", 3, "Timed windows (the median is reported).")
flags.DEFINE_bool("breakdown", True, "Also time the update alone and the batch transfer.")
flags.DEFINE_list("steps_per_call", ["1"],
                  "Training steps per jitted call (training.steps_per_call); several values, "
                  "e.g. 1,8, are measured in one run and compared with the first.")
FLAGS = flags.FLAGS

# Dense peak FLOP/s of common accelerators (vendor figures, no sparsity). "float32" is
# the TF32 tensor-core peak: under JAX's default matmul precision, float32 convolutions
# and matmuls run on TF32 tensor cores on these GPUs (measured: the float32 CT step
# reaches 2.7x the plain-FP32 peak of 67 TFLOP/s on an H200, impossible without them).
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def peak_for(device, dtype: str) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peaks in PEAK_FLOPS.items():
        if name in kind:
            return peaks.get(dtype)
    return None


GIB = 2**30


def is_out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "Out of memory" in str(err)


def memory_line(compiled) -> tuple[str, str | None]:
    """(the compiled step's memory needs as a printable line, None or why it cannot run).

    XLA's buffer assignment: arguments (the state, the batch, frozen weights), outputs
    not aliased to a donated argument, and scratch, against the allocator's
    `bytes_limit` on device 0 (GPU / TPU; CPUs report none, and are not checked)."""
    m = compiled.memory_analysis()
    if m is None:
        return "memory analysis unavailable", None
    need = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes \
        + m.temp_size_in_bytes
    line = (f"step memory: arguments {m.argument_size_in_bytes / GIB:.2f} GiB, scratch "
            f"{m.temp_size_in_bytes / GIB:.2f} GiB, total {need / GIB:.2f} GiB")
    limit = device_limit()
    if not limit:
        return line, None
    line += f" (device limit {limit / GIB:.2f} GiB)"
    too_big = None
    if need > limit:
        too_big = (f"the step needs {need / GIB:.1f} GiB, more than the {limit / GIB:.1f} GiB "
                   "the allocator may use; use a smaller batch or raise "
                   "XLA_PYTHON_CLIENT_MEM_FRACTION")
    return line, too_big


def device_limit() -> float | None:
    """Bytes the allocator may use on device 0 (GPU / TPU), None where unknown (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def back_to_back(call, n: int) -> tuple[float, float]:
    """Runs `call()` (which returns device arrays) `n` times without waiting, as training
    does; (wall seconds per call once the device is done, median host seconds per call)."""
    hosts, out = [], None
    t0 = time.perf_counter()
    for _ in range(n):
        tc = time.perf_counter()
        out = call()
        hosts.append(time.perf_counter() - tc)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n, float(np.median(hosts))


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def random_frozen(setup: Setup, params):
    """The step's frozen inputs (its key, and random weights: the same cost as trained ones).

    Returns (frozen, teacher_apply_fn): for CD a teacher of the student's shape (a copy
    of `params`), for `cm.metric=lpips` randomly initialised LPIPS weights.
    """
    teacher_apply, frozen = None, {"step_key": setup.step_key}
    wanted = setup.objective.frozen_inputs(setup.cm)
    if "teacher" in wanted:
        teacher_apply = setup.apply_fn
        frozen["teacher"] = jax.tree.map(lambda p: p + 0.0, params)
    if "lpips" in wanted:
        from cm.nets import lpips

        frozen["lpips"] = jax.device_put(lpips.init_variables(jax.random.PRNGKey(2)),
                                         setup.replicated)
    return frozen, teacher_apply


def random_step(setup: Setup, k: int = 1):
    """(state, frozen inputs, the jitted step of k steps per call, a host batch, the step's
    batch argument on the mesh) with random data of the config's shape: the step alone,
    as `cm.train` builds it (same `Setup`, same keys)."""
    config = setup.config
    state = setup.init_state()
    frozen, teacher_apply = random_frozen(setup, state.params)
    step_fn = train_step.make_train_step(
        setup.apply_fn, setup.cm, setup.objective, setup.tx, config.training.rates, setup.mesh,
        teacher_apply_fn=teacher_apply, steps_per_call=k)
    b, s, c = config.training.batch_size, config.data.image_size, config.data.num_channels
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32),
            "z": rng.standard_normal((b, s, s, c), dtype=np.float32)}
    if config.model.num_classes > 0:
        host["label"] = rng.integers(0, config.model.num_classes, (b,), dtype=np.int32)
    batch = distributed.shard_batch(host, setup.mesh)
    if k > 1:  # k steps' batches (the same arrays: the cost is the same)
        batch = tuple(distributed.shard_batch(host, setup.mesh) for _ in range(k))
    return state, frozen, step_fn, host, batch


def benchmark(config, steps: int, windows: int, breakdown: bool = True,
              steps_per_call: int = 1) -> dict:
    """Times `steps` calls per window of the step (each call `steps_per_call` steps)."""
    setup = Setup(config)
    state, frozen, step_fn, host, batch = random_step(setup, steps_per_call)
    ema_rates = setup.config.training.rates
    b, k = config.training.batch_size, steps_per_call

    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch, frozen)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # FLOPs of the program before backend optimisation: on GPUs the compiled module
    # hands convolutions to cuDNN custom calls, which XLA's cost analysis does not count
    # (it reported 1.3 TFLOP for a step that does 144 TFLOP); on CPU the two agree.
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    memory, too_big = memory_line(compiled)
    if too_big:
        raise SystemExit(f"{memory}: {too_big}")
    step_fn = compiled  # the program just compiled (a jitted call would compile again)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step_fn(holder["state"], batch, frozen)
        return metrics

    back_to_back(one_step, 1)  # warm up
    windows_s = [back_to_back(one_step, steps) for _ in range(windows)]
    rates = [k / per_call for per_call, _ in windows_s]  # steps/s
    state = holder["state"]
    sps = float(np.median(rates))
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "devices": jax.device_count(), "batch": b, "loss": setup.cm.loss,
           "params": nets.count_params(state.params),
           "compile_s": compile_s, "steps_per_s": sps, "images_per_s": sps * b,
           "flops_per_step": flops / k, "tflops_per_s": flops / k * sps / 1e12,
           "steps_per_call": k,
           "dispatch_s": float(np.median([host for _, host in windows_s])) / k,
           "memory": memory}
    peak = peak_for(jax.devices()[0], config.model.dtype)
    if peak and flops:
        out["fraction_of_peak"] = flops / k * sps / (peak * jax.device_count())
    if breakdown:
        update = jax.jit(
            lambda st, g: train_step.apply_updates(st, g, setup.tx, setup.cm, setup.objective,
                                                   ema_rates)[0],
            donate_argnums=(0,))
        grads = jax.tree.map(lambda p: p * 1e-3, state.params)
        holder = {"state": update(state, grads)}  # compile; `state` is donated from here

        def one_update():
            holder["state"] = update(holder["state"], grads)
            return holder["state"].step

        back_to_back(one_update, 2)  # warm up
        out["update_s"], out["update_dispatch_s"] = back_to_back(one_update, max(steps, 5))
        out["transfer_s"] = _median_seconds(
            lambda: distributed.shard_batch(host, setup.mesh), max(steps, 5))
    return out


def main(argv):
    del argv
    ks = [int(k) for k in FLAGS.steps_per_call]
    results = [benchmark(FLAGS.config, FLAGS.steps, FLAGS.windows,
                         FLAGS.breakdown and i == 0, k) for i, k in enumerate(ks)]
    r = results[0]
    print(f"backend {r['backend']} ({r['device']} x{r['devices']}), cm.loss {r['loss']} "
          f"metric {FLAGS.config.cm.metric}, "
          f"params {r['params']:,}, global batch {r['batch']}, dtype {FLAGS.config.model.dtype}")
    for r in results:
        step_ms = 1e3 / r["steps_per_s"]
        print(f"-- {r['steps_per_call']} step(s) per call: compile {r['compile_s']:.1f} s; "
              f"{r['memory']}")
        print(f"{r['steps_per_s']:.3f} steps/s  {r['images_per_s']:.1f} images/s")
        print(f"host time per step: {1e3 * r['dispatch_s']:.2f} ms of the {step_ms:.2f} ms "
              f"step ({100 * r['dispatch_s'] / (step_ms / 1e3):.1f}%; dispatch is "
              "asynchronous: the host is the bottleneck only when this is not the smaller)")
    r = results[0]
    print(f"{r['flops_per_step'] / 1e9:.1f} GFLOP/step (XLA cost analysis)  "
          f"{r['tflops_per_s']:.2f} TFLOP/s achieved")
    if "fraction_of_peak" in r:
        print(f"{100 * r['fraction_of_peak']:.1f}% of the device's dense peak")
    if "update_s" in r:
        step_s = 1.0 / r["steps_per_s"]
        print(f"optimiser + EMA update alone, back to back: {1e3 * r['update_s']:.2f} ms "
              f"each ({100 * r['update_s'] / step_s:.1f}% of the step); host time per "
              f"call {1e3 * r['update_dispatch_s']:.2f} ms")
        print(f"host-to-device copy of one batch: {1e3 * r['transfer_s']:.2f} ms "
              f"({100 * r['transfer_s'] / step_s:.1f}% of the step; overlapped in training)")
    for r in results[1:]:
        base = results[0]
        print(f"{r['steps_per_call']} vs {base['steps_per_call']} steps per call: images/s "
              f"x{r['images_per_s'] / base['images_per_s']:.2f}, host time per step "
              f"x{r['dispatch_s'] / base['dispatch_s']:.2f}")


if __name__ == "__main__":
    app.run(main)
