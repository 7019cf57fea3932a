"""Times the jitted training step of a config on whatever backend is present.

  python -m bench.train_step --config configs/cifar10_ct.py --steps 50
  python -m bench.train_step --config configs/quickstart.py --config.training.batch_size=128

Prints steps/s and images/s after compilation (median of timed windows), the model
FLOPs per step from XLA's cost analysis, and, on a GPU whose peak is known, the
fraction of peak reached. Data and noise are random arrays already on the device,
so this measures the step alone (the input pipeline is measured by bench/assignment.py).
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cm import consistency, model, train_step

config_flags.DEFINE_config_file("config", "configs/cifar10_ct.py", "Config file.",
                                lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed steps per window.")
flags.DEFINE_integer("windows", 3, "Timed windows (the median is reported).")
FLAGS = flags.FLAGS

# Dense bf16 / fp32 peak FLOP/s of common accelerators (vendor figures, no sparsity).
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def peak_for(device, dtype: str) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peaks in PEAK_FLOPS.items():
        if name in kind:
            return peaks.get(dtype)
    return None


def benchmark(config, steps: int, windows: int) -> dict:
    cm_cfg = consistency.CMConfig.from_config(config)
    mesh = train_step.make_mesh()
    module = model.build_model(config)
    apply_fn = model.make_apply_fn(module)
    tx = train_step.make_optimizer(config.optim)
    params = model.init_params(module, jax.random.PRNGKey(0), config)
    state = train_step.init_state(params, tx, cm_cfg.loss, len(config.training.ema_rates))
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step_fn = train_step.make_train_step(apply_fn, cm_cfg, tx, tuple(config.training.ema_rates),
                                         mesh, jax.random.PRNGKey(1))
    b, s, c = config.training.batch_size, config.data.image_size, config.data.num_channels
    rng = np.random.default_rng(0)
    batch = {"x": rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32),
             "z": rng.standard_normal((b, s, s, c), dtype=np.float32)}
    batch = train_step.shard_batch(batch, mesh)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    state, metrics = step_fn(state, batch)  # warm up
    jax.block_until_ready(metrics)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        rates.append(steps / (time.perf_counter() - t0))
    sps = float(np.median(rates))
    out = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "devices": jax.device_count(), "batch": b, "params": model.count_params(params),
           "compile_s": compile_s, "steps_per_s": sps, "images_per_s": sps * b,
           "flops_per_step": flops, "tflops_per_s": flops * sps / 1e12}
    peak = peak_for(jax.devices()[0], config.model.dtype)
    if peak and flops:
        out["fraction_of_peak"] = flops * sps / (peak * jax.device_count())
    return out


def main(argv):
    del argv
    r = benchmark(FLAGS.config, FLAGS.steps, FLAGS.windows)
    print(f"backend {r['backend']} ({r['device']} x{r['devices']}), params {r['params']:,}, "
          f"global batch {r['batch']}, dtype {FLAGS.config.model.dtype}")
    print(f"compile {r['compile_s']:.1f} s")
    print(f"{r['steps_per_s']:.3f} steps/s  {r['images_per_s']:.1f} images/s")
    print(f"{r['flops_per_step'] / 1e9:.1f} GFLOP/step (XLA cost analysis)  "
          f"{r['tflops_per_s']:.2f} TFLOP/s achieved")
    if "fraction_of_peak" in r:
        print(f"{100 * r['fraction_of_peak']:.1f}% of the device's dense peak")


if __name__ == "__main__":
    app.run(main)
