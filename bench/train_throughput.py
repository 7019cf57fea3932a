"""Training throughput with each assignment method, as a ratio to vanilla, in one run.

    python -m bench.train_throughput                       # quickstart + CIFAR-shaped
    python -m bench.train_throughput --configs cifar --methods none,linear --steps 20

For each config and method this runs the real input path of `cm.train` (deterministic
host batches -> assignment in the background pipeline -> sharded device batch -> the
jitted train step) and times steady-state steps. Methods are measured in interleaved
windows (none, linear, knn, none, linear, ...) so that load on a shared machine hits
every method alike; the reported figure is the median window. The "CIFAR-shaped"
config is 3x32x32 images (random uint8, CIFAR-10 cannot be downloaded here) through a
small NCSN++ (`cifar`) or the real CIFAR-10 CT network (`cifar10_ct`, for accelerators).
"""

import argparse
import functools
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import assignment  # noqa: E402
from bench.train_step import random_frozen  # noqa: E402
from cm import data, input_pipeline, train, train_step  # noqa: E402
from configs import base, cifar10_ct, quickstart  # noqa: E402


def cifar_shaped(batch: int, full: bool = False, dtype: str = "float32", metric: str = ""):
    """3x32x32 images; the small smoke network, or the real CIFAR-10 CT one (`full`).

    `metric` overrides `cm.metric` (the real config uses LPIPS, with random weights here).
    """
    config = cifar10_ct.get_config() if full else base.shrink(base.get_config())
    if metric:
        config.cm.metric = metric
    config.data.name = "npz"  # images are supplied directly below
    config.training.batch_size = batch
    config.model.dtype = dtype
    return config


def make_runner(config, images: np.ndarray, method: str, where: str, steps: dict):
    """A closure that runs `n` training steps of `method`; returns their wall time.

    `steps` caches the jitted step by assignment path: every host-path method runs the
    same program (assignment happens before it), so one executable serves them all.
    With a separate step per method, the LPIPS CT step at batch 512 (55 GiB of scratch
    in bfloat16) ran out of memory on an H200 while warming up the methods, where
    the bare step alone runs; sharing the executable is meant to avoid that (not yet
    re-run on a GPU).
    """
    config = config.copy_and_resolve_references()
    config.assignment.method = method
    config.assignment.where = where
    setup = train.Setup(config)
    state = setup.init_state()
    key = (method, where) if where == "device" else "host"
    if key not in steps:
        steps[key] = train_step.make_train_step(
            setup.apply_fn, setup.cm, setup.tx, tuple(config.training.ema_rates),
            setup.mesh, setup.step_key,
            device_assign=input_pipeline.device_assign_fn(config.assignment))
    step_fn = steps[key]
    frozen, _ = random_frozen(setup, state.params)  # CT configs: random LPIPS weights
    batcher = data.Batcher(images, config.training.batch_size, 0, random_flip=False)
    place = functools.partial(train_step.shard_batch, mesh=setup.mesh)  # as cm.train does
    pipe = input_pipeline.make_input(config, batcher, 0, jax.local_device_count(), place)
    holder = {"state": state, "waited": 0.0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        metrics = None
        for _ in range(n):
            tw = time.perf_counter()
            batch, _ = assignment.split_diagnostics(next(pipe))
            holder["waited"] += time.perf_counter() - tw
            holder["state"], metrics = step_fn(holder["state"], batch, frozen)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t0

    return run, pipe, holder


def bench_config(name, config, images, methods, steps, windows):
    runners, steps_by_path = {}, {}
    for m in methods:
        method, _, where = m.partition("@")
        runners[m] = make_runner(config, images, method, where or "host", steps_by_path)
        runners[m][0](2)  # compile and warm up
        runners[m][2]["waited"] = 0.0
    times = {m: [] for m in methods}
    for _ in range(windows):
        for m in methods:
            times[m].append(runners[m][0](steps))
    b = config.training.batch_size
    base_rate = steps * b / float(np.median(times["none"]))
    for m in methods:
        rate = steps * b / float(np.median(times[m]))
        wait = runners[m][2]["waited"] / float(np.sum(times[m]))
        print(f"{name:<14} {m:<14} {rate:>10.1f} {rate / base_rate:>8.3f} {100 * wait:>8.1f}",
              flush=True)
    for _, pipe, _ in runners.values():
        pipe.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="quickstart,cifar")
    parser.add_argument("--methods", default="none,linear,knn,knn@device")
    parser.add_argument("--cifar-batch", type=int, default=128)  # 512 on an accelerator
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="model.dtype: float32 | bfloat16")
    parser.add_argument("--metric", default="", help="cm.metric override, e.g. pseudo_huber")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if methods[0] != "none":
        methods = ["none"] + [m for m in methods if m != "none"]
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind} x"
          f"{jax.device_count()}), {os.cpu_count()} CPUs, "
          f"auto solver {assignment.resolve_solver('auto')}")
    print(f"{'config':<14} {'method':<14} {'img/s':>10} {'x none':>8} {'wait %':>8}")
    for name in args.configs.split(","):
        if name == "quickstart":
            config = quickstart.get_config()
            images = data.load_images(data.DataConfig.from_config(config))
        elif name in ("cifar", "cifar10_ct"):
            config = cifar_shaped(args.cifar_batch, full=name == "cifar10_ct", dtype=args.dtype,
                                  metric=args.metric)
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)
        else:
            raise SystemExit(f"unknown config {name!r}: quickstart | cifar | cifar10_ct")
        bench_config(name, config, images, methods, args.steps, args.windows)


if __name__ == "__main__":
    main()
