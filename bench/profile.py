"""Where the training step's time goes: a `jax.profiler` trace of a few steps, and the
top operations by time.

  python -m bench.profile --config configs/cifar10_ct.py --config.model.dtype=bfloat16
  python -m bench.profile --config configs/quickstart.py --trace_steps 20

Builds the step as `bench.train_step` does (random data already on the device), warms
it up, traces `--trace_steps` steps with `jax.profiler.trace(create_perfetto_trace=True)`
into `--out` (open it in TensorBoard's profile plugin or ui.perfetto.dev), then reads
the Perfetto trace back and prints the operations that took the most time on the
device's streams (on a CPU, the XLA:CPU thunks), summed over the traced steps, with
their share of the total and the time per step.
"""

import collections
import glob
import gzip
import json
import os
import tempfile
import time

import jax
from absl import app, flags

from bench.train_step import random_step
from cm.setup import Setup

# --config is bench.train_step's flag (imported above): the same step, the same default.
flags.DEFINE_integer("trace_steps", 5, "Steps traced.")
flags.DEFINE_integer("top", 25, "Operations listed.")
flags.DEFINE_integer("calls_per_step", 1, "training.steps_per_call of the traced step.")
flags.DEFINE_string("out", "", "Trace directory ('' = a temporary one, deleted).")
FLAGS = flags.FLAGS


def device_events(trace: dict) -> list[dict]:
    """Complete events ("ph": "X") on device threads, or on every thread if there are no
    device ones (a CPU backend's trace has only host threads)."""
    names = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e.get("args", {}).get("name", "")
    device_pids = {pid for pid, n in names.items() if "/device:" in n and "CPU" not in n}
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    on_device = [e for e in events if e["pid"] in device_pids]
    if on_device:
        return on_device
    # Host only: the XLA:CPU operations, without Python frames ("$file:line name") and
    # the runtime's wrappers around them (which contain the operations' time again).
    wrappers = ("ThunkExecutor", "PjitFunction", "PjRt", "ExecuteHelper", "Execute(")
    return [e for e in events if not e["name"].startswith("$")
            and not any(w in e["name"] for w in wrappers)]


def top_operations(events: list[dict], top: int) -> list[tuple[str, float, int]]:
    """(name, total microseconds, count), the `top` largest by time."""
    total = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        total[e["name"]] += float(e["dur"])
        count[e["name"]] += 1
    return sorted(((n, t, count[n]) for n, t in total.items()), key=lambda r: -r[1])[:top]


def read_trace(log_dir: str) -> dict:
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True))
    if not paths:
        raise SystemExit(f"no Perfetto trace was written under {log_dir}")
    with gzip.open(paths[-1], "rt") as f:
        return json.load(f)


def profile(config, steps: int, log_dir: str, k: int = 1) -> tuple[dict, float]:
    """(the Perfetto trace of `steps` calls of k steps each, wall seconds per step)."""
    state, frozen, step_fn, _, batch = random_step(Setup(config), k)
    for _ in range(2):  # compile and warm up outside the trace
        state, metrics = step_fn(state, batch, frozen)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, batch, frozen)
        jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / (steps * k)
    return read_trace(log_dir), wall


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = FLAGS.out or tmp
        k = FLAGS.calls_per_step
        trace, wall = profile(FLAGS.config, FLAGS.trace_steps, log_dir, k)
    events = device_events(trace)
    rows = top_operations(events, FLAGS.top)
    all_us = sum(float(e["dur"]) for e in events)
    n_steps = FLAGS.trace_steps * k
    busy = all_us / 1e6 / n_steps
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"{n_steps} steps traced ({k} per call), {len(events)} events"
          + (f"; trace in {FLAGS.out}" if FLAGS.out else ""))
    print(f"operation time {1e3 * busy:.3f} ms per step, wall {1e3 * wall:.3f} ms per step "
          f"(traced): the operations fill {100 * busy / wall:.0f}% of the wall time (on a "
          "GPU, the device-only rate over the achieved one; on a CPU, operations can "
          "overlap on several threads)")
    print(f"{'share':>6} {'ms/step':>9} {'count/step':>10}  operation")
    for name, us, n in rows:
        print(f"{100 * us / all_us:5.1f}% {us / 1e3 / n_steps:9.3f} {n / n_steps:10.1f}"
              f"  {name[:110]}")


if __name__ == "__main__":
    app.run(main)
