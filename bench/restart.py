"""Start-up time with and without a warm persistent compilation cache, in one run.

Launches `main.py` twice with the same config, each time in a new workdir, sharing a
compilation cache directory that starts empty: the first launch compiles everything
and fills the cache, the second reuses it. Prints each launch's wall time to its last
step (process start to exit), the compile line each one logged, and the ratio.

  python -m bench.restart                       # the quickstart, 10 steps
  python -m bench.restart --config configs/quickstart.py --steps 10
  python -m bench.restart --second_seed 1       # the second launch with another seed

With `--second_seed`, the second launch trains another seed of the same config: the seed
is an argument of the compiled programs, not a constant, so it finds them in the cache
too (a seed sweep compiles once).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(config: str, workdir: str, cache_dir: str, steps: int,
           seed: int | None = None) -> tuple[float, str]:
    """(wall seconds of one training launch, its 'first step done' log line)."""
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config", config,
           "--workdir", workdir, f"--compilation_cache_dir={cache_dir}",
           f"--config.training.n_iters={steps}", f"--config.training.log_every={steps}"]
    if seed is not None:
        cmd.append(f"--config.training.seed={seed}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next((m.group(0) for m in re.finditer(r"first step done.*", proc.stderr)), "?")
    return wall, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--second_seed", type=int, default=None,
                        help="training.seed of the second launch (default: the config's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "jax_cache")
        cold, cold_line = launch(args.config, os.path.join(tmp, "a"), cache, args.steps)
        warm, warm_line = launch(args.config, os.path.join(tmp, "b"), cache, args.steps,
                                 args.second_seed)
    print(f"{args.config}, {args.steps} steps, launch to exit (imports, data, init, "
          "compiles, steps, final checkpoint and grid):")
    print(f"  empty cache: {cold:6.1f} s   {cold_line}")
    other = "" if args.second_seed is None else f", seed {args.second_seed}"
    print(f"  warm cache{other}:  {warm:6.1f} s   {warm_line}")
    print(f"  ratio warm / empty: {warm / cold:.2f}")


if __name__ == "__main__":
    main()
