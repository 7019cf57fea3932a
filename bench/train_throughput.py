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

from assignment import _linear  # noqa: E402
from bench.train_step import is_out_of_memory, memory_line, random_frozen  # noqa: E402
from cm import config as config_lib
from cm import data, pairing, train_step  # noqa: E402
from cm.runtime import distributed
from cm.runtime.views import DataConfig, view
from cm.setup import Setup
from configs import base, cifar10_ct, quickstart  # noqa: E402


def cifar_shaped(batch: int, full: bool = False, dtype: str = "float32", metric: str = "",
                 smoke: bool = False):
    """3x32x32 images; the small smoke network, or the real CIFAR-10 CT one (`full`).

    `metric` overrides `cm.metric` (the real config uses LPIPS, with random weights here).
    `smoke` shrinks the real config's network (`cifar10_ct.py:smoke`), to check on a CPU
    that a GPU command line runs.
    """
    if full:
        config = cifar10_ct.get_config("smoke" if smoke else None)
    else:
        config = base.shrink(base.get_config())
    if metric:
        config.cm.metric = metric
    config.data.name = "npz"  # images are supplied directly below
    config.training.batch_size = batch
    config.model.dtype = dtype
    return config


class Shared:
    """What every method of one config shares: the setup, one training state and its
    frozen inputs, and the compiled step per assignment path.

    Every host-path method runs the same program (assignment happens before it), so
    one executable serves them all, and the methods take turns advancing one state.
    With a state and an executable per method, the LPIPS CT step at batch 512 ran out
    of memory on an H200 while warming up the second method, where the bare step alone
    runs (the bf16 step asked for 55 GiB of scratch).
    """

    def __init__(self, config):
        self.setup = Setup(config)
        self.holder = {"state": self.setup.init_state()}
        self.frozen, _ = random_frozen(self.setup, self.holder["state"].params)
        self.compiled = {}

    def compile(self, pair, a, batch):
        """(the compiled step for assignment config `a`, its memory line, None or why it
        does not fit, whether it was new); compiled once per path (host, or each in-step
        method)."""
        key = (a.method, a.where) if a.where == "device" else "host"
        new = key not in self.compiled
        if new:
            s = self.setup
            step = train_step.make_train_step(
                s.apply_fn, s.cm, s.objective, s.tx, s.config.training.rates, s.mesh,
                device_assign=pair.device_fn)
            compiled = step.lower(self.holder["state"], batch, self.frozen).compile()
            self.compiled[key] = (compiled, *memory_line(compiled))
        return (*self.compiled[key], new)


def make_runner(shared: Shared, step_fn, pipe):
    """A closure that runs `n` training steps of compiled `step_fn` on batches from
    `pipe` (the real input path of `cm.train`: deterministic host batches, assignment
    in the background pipeline, batches placed on the mesh in that thread); returns
    their wall time. `waited` accumulates the time spent waiting for batches."""
    waited = {"s": 0.0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        metrics = None
        for _ in range(n):
            tw = time.perf_counter()
            batch = next(pipe)["batch"]
            waited["s"] += time.perf_counter() - tw
            shared.holder["state"], metrics = step_fn(shared.holder["state"], batch,
                                                      shared.frozen)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t0

    return run, waited


def bench_config(name, config, images, methods, steps, windows) -> bool:
    """Prints one row per method; False (with the reason) if the config did not fit."""
    shared = Shared(config)
    runners, pipes = {}, []
    try:
        for m in methods:
            method, _, where = m.partition("@")
            cfg = config.copy_and_resolve_references()
            cfg.assignment.method, cfg.assignment.where = method, where or "host"
            batcher = data.Batcher(images, cfg.training.batch_size, 0, random_flip=False)
            place = functools.partial(distributed.shard_batch, mesh=shared.setup.mesh)
            pair = pairing.Pairing(config_lib.build(cfg).assignment, 0, jax.local_device_count())
            pipes.append(pair.inputs(batcher, 0, place))
            batch = next(pipes[-1])["batch"]
            step_fn, line, too_big, new = shared.compile(pair, cfg.assignment, batch)
            if new:  # a new program: report what it needs
                print(f"{name:<14} {m:<14} {line}", flush=True)
                if too_big:
                    print(f"{name:<14} skipped: {too_big} (--cifar-batch)", flush=True)
                    return False
            runners[m] = make_runner(shared, step_fn, pipes[-1])
            runners[m][0](2)  # warm up
            runners[m][1]["s"] = 0.0
        times = {m: [] for m in methods}
        for _ in range(windows):
            for m in methods:
                times[m].append(runners[m][0](steps))
    except jax.errors.JaxRuntimeError as err:
        if not is_out_of_memory(err):
            raise
        print(f"{name:<14} out of device memory: {str(err).splitlines()[0][:300]}",
              flush=True)
        return False
    finally:
        for pipe in pipes:
            pipe.close()
    b = config.training.batch_size
    base_rate = steps * b / float(np.median(times["none"]))
    for m in methods:
        rate = steps * b / float(np.median(times[m]))
        wait = runners[m][1]["s"] / float(np.sum(times[m]))
        print(f"{name:<14} {m:<14} {rate:>10.1f} {rate / base_rate:>8.3f} {100 * wait:>8.1f}",
              flush=True)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="quickstart,cifar")
    parser.add_argument("--methods", default="none,linear,knn,knn@device")
    parser.add_argument("--cifar-batch", type=int, default=128)  # 512 on an accelerator
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="model.dtype: float32 | bfloat16")
    parser.add_argument("--metric", default="", help="cm.metric override, e.g. pseudo_huber")
    parser.add_argument("--smoke", action="store_true",
                        help="cifar10_ct with the :smoke network (a CPU check of the command)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if methods[0] != "none":
        methods = ["none"] + [m for m in methods if m != "none"]
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind} x"
          f"{jax.device_count()}), {os.cpu_count()} CPUs, "
          f"auto solver {_linear.resolve_solver('auto')}")
    print(f"{'config':<14} {'method':<14} {'img/s':>10} {'x none':>8} {'wait %':>8}")
    ok = True
    for name in args.configs.split(","):
        if name == "quickstart":
            config = quickstart.get_config()
            images = data.load_images(view(DataConfig, config.data))
        elif name in ("cifar", "cifar10_ct"):
            config = cifar_shaped(args.cifar_batch, full=name == "cifar10_ct", dtype=args.dtype,
                                  metric=args.metric, smoke=args.smoke)
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)
        else:
            raise SystemExit(f"unknown config {name!r}: quickstart | cifar | cifar10_ct")
        ok &= bench_config(name, config, images, methods, args.steps, args.windows)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
