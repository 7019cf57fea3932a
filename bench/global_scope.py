"""What `assignment.scope=global` costs each process per step, against `host` in the same run.

  python -m bench.global_scope [--batches 512,1024] [--processes 1,2,4,8] [--steps 5]

With the global scope every process builds the whole global batch (images, flips and
noise of every row: they are functions of (seed, step, global row), so no process waits
for another) and solves the one global assignment, then keeps its rows; with `host` it
builds and pairs only its own rows. Prints, per global batch and process count, the
milliseconds per step of one process's input stage (batch + pairing, CIFAR-10's shape,
`linear`, l2, float32) and the ratio global / host. On an accelerator this runs in the
input thread, ahead of the device (its cost hides behind the step while it is shorter).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from cm import config as config_lib
from cm import data, pairing
from configs import base


def per_step_ms(images, batch: int, processes: int, scope: str, steps: int) -> float:
    config = base.get_config()
    config.assignment.method, config.assignment.scope = "linear", scope
    a = config_lib.build(config).assignment
    batcher = data.Batcher(images, batch, 0, 0, processes, random_flip=True)
    stage = pairing.Pairing(a, 0, 1, 0, processes)
    with stage.inputs(batcher, 0, place=lambda arrays: arrays) as items:
        next(items)  # warm up (the solver's first call, the epoch permutation)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(items)
        return 1000 * (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.global_scope", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="512,1024")
    p.add_argument("--processes", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    images = np.random.default_rng(0).integers(0, 256, (50_000, 32, 32, 3), np.uint8)
    print("| global batch | processes | host ms/step | global ms/step | global / host |")
    print("|---|---|---|---|---|", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        for procs in (int(n) for n in args.processes.split(",")):
            host = per_step_ms(images, batch, procs, "host", args.steps)
            glob = per_step_ms(images, batch, procs, "global", args.steps)
            print(f"| {batch} | {procs} | {host:.0f} | {glob:.0f} | {glob / host:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
