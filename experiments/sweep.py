"""A sweep: a grid of config overrides times seeds, one workdir per run, trained and evaluated.

  python -m experiments.sweep --config configs/quickstart.py \
      --grid assignment.method=none,linear,knn --seeds 0,1,2 --root runs/sweep \
      --set training.n_iters=600 --set training.snapshot_every=100

Each run is `main.py --mode train` then `main.py --mode eval` in its own subprocess (which
isolates JAX state), in `<root>/<key=value,...>/seed<k>`; every run's `eval.jsonl` rows
are then collected into `<root>/results.jsonl` with their arm and seed. Re-running skips
finished runs and resumes the others (main.py resumes from the workdir by itself).
`--print-only` prints the command lines instead, for launching on a cluster.
`--parallel N` runs N runs at once (e.g. on one large GPU, with
`XLA_PYTHON_CLIENT_MEM_FRACTION` set to a share per process); each subprocess's output
then goes to `<workdir>.<mode>.out` beside its workdir.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

RESULTS = "results.jsonl"  # the collected rows, under the sweep root
EVAL_RESULTS = "eval.jsonl"  # a run's rows, under its workdir (see evaluation/progress.py)
MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py")

__all__ = ["RESULTS", "Run", "arm_name", "collect", "eval_command", "expand", "is_done",
           "is_evaluated", "is_trained", "main", "parse_arms", "parse_grid", "parse_seeds",
           "resolve_config", "run_sweep", "snapshot_warning", "train_command"]


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep.

    Attributes:
      arm: the grid point, e.g. 'assignment.method=linear' ('default' without a grid).
      seed: `training.seed`.
      workdir: `<root>/<arm>/seed<seed>`.
      overrides: every `key=value` given to main.py as `--config.key=value`: the
        sweep-wide `--set` ones, then the grid point, then the seed.
    """

    arm: str
    seed: int
    workdir: str
    overrides: tuple[str, ...]


# ----------------------------------------------------------------------------------------
# Expansion.


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parses `--grid key=v1,v2,...` items into (key, values), in the order given.

    Raises:
      ValueError: an item without '=' or without values, or a key given twice.
    """
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ValueError(f"--grid {item!r}: expected key=value1,value2,...")
        if key.strip() in {k for k, _ in grid}:
            raise ValueError(f"--grid: key {key.strip()!r} given twice")
        grid.append((key.strip(), vals))
    return grid


def parse_seeds(spec: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '0-2' -> [0, 1, 2] too."""
    seeds: list[int] = []
    for item in (s.strip() for s in str(spec).split(",") if s.strip()):
        lo, sep, hi = item.partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(item)])
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def arm_name(point: Sequence[tuple[str, str]]) -> str:
    """The name (and directory) of a grid point: 'k1=v1,k2=v2', or 'default' when empty."""
    if not point:
        return "default"
    return ",".join(f"{k}={v}" for k, v in point).replace(os.sep, "_")


def parse_arms(items: Sequence[str]) -> list[list[tuple[str, str]]]:
    """Parses `--arm "k1=v1 k2=v2"` items into explicit grid points (not a product):
    e.g. the couplings of the flow-matching sweep, where `assignment.cost` matters for
    `linear` only.

    Raises:
      ValueError: an entry without '=', or a key given twice in one arm.
    """
    arms = []
    for item in items:
        point = []
        for entry in item.split():
            key, sep, value = entry.partition("=")
            if not sep or not key or not value:
                raise ValueError(f"--arm {item!r}: expected 'key=value key=value ...'")
            if key in {k for k, _ in point}:
                raise ValueError(f"--arm {item!r}: key {key!r} given twice")
            point.append((key, value))
        if not point:
            raise ValueError("--arm: empty")
        arms.append(point)
    return arms


def expand(grid: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int], root: str,
           sets: Sequence[str] = (), arms: Sequence[Sequence[tuple[str, str]]] = ()
           ) -> list[Run]:
    """The runs of a sweep: the cartesian product of the grid's values, times the seeds.

    Runs are ordered seed-major (every arm of seed 0, then of seed 1, ...), so that a
    sweep cut short still has every arm for its first seeds.

    Args:
      grid: (config key, values) pairs, e.g. [('assignment.method', ['none', 'knn'])].
      seeds: values of `training.seed`.
      root: the sweep's directory.
      sets: sweep-wide 'key=value' overrides, applied to every run.
      arms: explicit grid points (`parse_arms`), instead of the grid's product.

    Returns:
      One `Run` per (seed, grid point).

    Raises:
      ValueError: a key that is both swept and set, or `training.seed` set or swept.
    """
    if grid and arms:
        raise ValueError("give --grid or --arm, not both")
    set_keys = [s.partition("=")[0] for s in sets]
    keys = [k for k, _ in grid] + sorted({k for arm in arms for k, _ in arm})
    for k in set_keys + keys:
        if k == "training.seed":
            raise ValueError("training.seed is set by --seeds; do not pass it in --set/--grid")
    if both := set(set_keys) & set(keys):
        raise ValueError(f"keys both swept (--grid) and set (--set): {sorted(both)}")
    points = [list(arm) for arm in arms] or [
        list(zip(keys, vals, strict=True)) for vals in itertools.product(*(v for _, v in grid))]
    runs = []
    for seed in seeds:
        for point in points:
            arm = arm_name(point)
            overrides = (*sets, *(f"{k}={v}" for k, v in point), f"training.seed={seed}")
            runs.append(Run(arm, seed, os.path.join(root, arm, f"seed{seed}"), overrides))
    return runs


# ----------------------------------------------------------------------------------------
# Commands and the "done" checks.


def _command(mode: str, config: str, run: Run, python: str, main_py: str) -> list[str]:
    return [python, main_py, "--config", config, "--workdir", run.workdir, "--mode", mode,
            *(f"--config.{o}" for o in run.overrides)]


def train_command(config: str, run: Run, python: str = sys.executable,
                  main_py: str = MAIN) -> list[str]:
    """The `main.py --mode train` command line of a run."""
    return _command("train", config, run, python, main_py)


def eval_command(config: str, run: Run, python: str = sys.executable,
                 main_py: str = MAIN) -> list[str]:
    """The `main.py --mode eval` command line of a run (its eval section comes from the
    same config and overrides, so the sweep's eval settings apply)."""
    return _command("eval", config, run, python, main_py)


def resolve_config(config: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Loads a config file with `key=value` overrides exactly as main.py does.

    Raises:
      ValueError: a missing file, an unknown key or a value of the wrong type.
    """
    argv = ["sweep", f"--config={config}", *(f"--config.{o}" for o in overrides)]
    fv = flags.FlagValues()  # the overrides are read from `sys_argv`, as main.py's from sys.argv
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
        return fv.config
    except (flags.Error, AttributeError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"config {config} with overrides {list(overrides)}: {e}") from e


def is_trained(workdir: str, n_iters: int) -> bool:
    """Whether `workdir` holds the final snapshot (train saves it in checkpoints/<n_iters>)."""
    return os.path.isdir(os.path.join(workdir, "checkpoints", str(n_iters)))


def read_rows(workdir: str) -> list[dict]:
    """The rows of `<workdir>/eval.jsonl` ([] when there is none)."""
    path = os.path.join(workdir, EVAL_RESULTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_evaluated(workdir: str, n_iters: int, samplers: Sequence[str], n_samples: int) -> bool:
    """Whether eval.jsonl has a row of the final step for every sampler, with n_samples.

    The evaluation goes through the steps in ascending order, so rows of the final step
    mean that the earlier steps are done too.
    """
    have = {(r.get("step"), r.get("sampler"), r.get("n")) for r in read_rows(workdir)}
    return all((n_iters, s, n_samples) in have for s in samplers)


def is_done(run: Run, config: ml_collections.ConfigDict, evaluate: bool = True) -> bool:
    """A run is done when its final checkpoint exists and (if `evaluate`) its rows too."""
    n = int(config.training.n_iters)
    if not is_trained(run.workdir, n):
        return False
    return not evaluate or is_evaluated(run.workdir, n, tuple(config.eval.samplers),
                                        int(config.eval.n_samples))


def snapshot_warning(config: ml_collections.ConfigDict) -> str | None:
    """A warning when training deletes snapshots that the evaluation afterwards would want."""
    t = config.training
    wanted = t.n_iters // t.snapshot_every if t.snapshot_every else 0
    if wanted > t.keep_snapshots:
        return (f"training.keep_snapshots={t.keep_snapshots} < n_iters / snapshot_every = "
                f"{wanted}: only the last {t.keep_snapshots} snapshots survive to be "
                f"evaluated; pass --set training.keep_snapshots={wanted} for the full curve")
    return None


# ----------------------------------------------------------------------------------------
# Running and collecting.

Executor = Callable[[list[str]], int]


def _subprocess(cmd: list[str]) -> int:
    return subprocess.run(cmd, check=False).returncode


def _subprocess_to_file(cmd: list[str]) -> int:
    """Runs `cmd` with its output in `<workdir>.<mode>.out` (parallel runs do not mix)."""
    out = f"{cmd[cmd.index('--workdir') + 1]}.{cmd[cmd.index('--mode') + 1]}.out"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "a") as f:
        return subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT).returncode


def run_sweep(config: str, runs: Sequence[Run], *, evaluate: bool = True,
              execute: Executor | None = None,
              done: Callable[[Run, ml_collections.ConfigDict], bool] | None = None,
              log: Callable[[str], None] = lambda s: print(s, flush=True),
              parallel: int = 1) -> dict[str, list[Run]]:
    """Trains (and evaluates) the runs, `parallel` at a time, skipping finished ones.

    Args:
      config: the config file path.
      runs: from `expand`.
      evaluate: also run `--mode eval` after training.
      execute: runs one command line, returns its exit status (tests inject a fake;
        default: a subprocess, whose output goes to `<workdir>.<mode>.out` when
        `parallel` > 1).
      done: whether a run is finished (default `is_done`).
      log: progress lines.
      parallel: how many runs at once (each run's train and eval stay in order).

    Returns:
      {'skipped': [...], 'ran': [...], 'failed': [...]}, each in the order of `runs`.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    done = done or (lambda r, c: is_done(r, c, evaluate))
    execute = execute or (_subprocess if parallel == 1 else _subprocess_to_file)

    def one(i: int, run: Run) -> str:
        cfg = resolve_config(config, run.overrides)
        tag = f"[{i + 1}/{len(runs)}] {run.arm} seed {run.seed}"
        if done(run, cfg):
            log(f"{tag}: done, skipped")
            return "skipped"
        t0 = time.perf_counter()
        status = 0
        if not is_trained(run.workdir, int(cfg.training.n_iters)):
            log(f"{tag}: training in {run.workdir}")
            status = execute(train_command(config, run))
        if status == 0 and evaluate:
            log(f"{tag}: evaluating")
            status = execute(eval_command(config, run))
        if status != 0:
            log(f"{tag}: FAILED (exit status {status}); see {run.workdir}/log*")
            return "failed"
        log(f"{tag}: finished in {time.perf_counter() - t0:.0f} s")
        return "ran"

    if parallel == 1:
        kinds = [one(i, run) for i, run in enumerate(runs)]
    else:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            kinds = list(pool.map(one, range(len(runs)), runs))
    out: dict[str, list[Run]] = {"skipped": [], "ran": [], "failed": []}
    for kind, run in zip(kinds, runs, strict=True):
        out[kind].append(run)
    return out


def collect(runs: Sequence[Run], root: str) -> str:
    """Writes every run's eval.jsonl rows, with 'arm', 'seed' and 'workdir', to
    `<root>/results.jsonl` (rewritten each time); returns its path."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, RESULTS)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for run in runs:
            for row in read_rows(run.workdir):
                f.write(json.dumps({**row, "arm": run.arm, "seed": run.seed,
                                    "workdir": run.workdir}) + "\n")
    os.replace(tmp, path)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file, as for main.py")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept config key (repeat for a cartesian product)")
    p.add_argument("--arm", action="append", default=[], metavar='"K1=V1 K2=V2"',
                   help="one arm's overrides (repeat; instead of --grid's product)")
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2 or 0-2")
    p.add_argument("--root", required=True, help="sweep directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run (repeatable)")
    p.add_argument("--print-only", action="store_true",
                   help="print the main.py command lines and exit")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate each run after training (default: yes)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at once (default 1); output of each in <workdir>.<mode>.out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        runs = expand(parse_grid(args.grid), parse_seeds(args.seeds), args.root, args.set,
                      parse_arms(args.arm))
        configs = [resolve_config(args.config, r.overrides) for r in runs]  # typos fail here
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = snapshot_warning(configs[0]) if args.eval and configs else None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.print_only:
        for run in runs:
            modes = [train_command] + ([eval_command] if args.eval else [])
            for make in modes:
                print(shlex.join(make(args.config, run, "python", "main.py")))
        return 0
    out = run_sweep(args.config, runs, evaluate=args.eval, parallel=args.parallel)
    path = collect(runs, args.root)
    print(f"{len(out['ran'])} ran, {len(out['skipped'])} skipped, {len(out['failed'])} "
          f"failed; rows in {path}; report: python -m experiments.report --root {args.root}")
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
