"""Times noise assignment at CIFAR-10 size (3x32x32) on the present backend.

    python bench/assignment.py                      # table "assignment", digits images
    python bench/assignment.py --batches 1024 --dtypes float16 --repeats 5
    python bench/assignment.py --data cifar.npz     # real images: uint8 'images' NHWC

Table "assignment": for each batch size and distance dtype, the time of the
distances and of the solve for every host solver, knn and the on-device (jitted)
variants; the distance reduction; each method's speed as a ratio to
`scipy.optimize.linear_sum_assignment` on the same costs in the same run
(x scipy solve: solve time alone; x scipy total: distances + solve). Times are the
minimum over `--repeats` runs, interleaved so that load on a shared machine hits
every method alike.
"""

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import assignment  # noqa: E402
from assignment import (  # noqa: E402
    _cost,  # noqa: E402
    _device,
    _diagnostics,
    _knn,
    _linear,
)

SHAPE = (32, 32, 3)
NAN = float("nan")


def load_images(data: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` images `[n, 32, 32, 3]` in [-1, 1]: "digits", "uniform" or an .npz path."""
    if data == "uniform":
        return rng.uniform(-1, 1, (n, *SHAPE)).astype(np.float32)
    if data == "digits":  # Real images: 8x8 digits, upsampled and tinted per channel.
        from sklearn.datasets import load_digits

        digits = load_digits().images[rng.choice(1797, n, replace=n > 1797)] / 16.0
        digits = np.repeat(np.repeat(digits, 4, axis=1), 4, axis=2)[..., None]
        tint = rng.uniform(0.3, 1.0, (n, 1, 1, 3))
        return (2 * digits * tint - 1).astype(np.float32)
    with np.load(data) as f:
        images = f["images"] if "images" in f else f["x"]
    images = images[rng.choice(len(images), n, replace=n > len(images))]
    return (images.astype(np.float32) / 127.5 - 1.0).reshape(n, *SHAPE)


def wall_time(fn: Callable[[], object]) -> float:
    """Wall time of one `fn()` call."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def best_time(fn: Callable[[], object], repeats: int, budget_s: float = 2.0) -> float:
    """Minimum wall time of `fn()` over `repeats` runs (fewer if one run is slow)."""
    jax.block_until_ready(fn())  # Warm-up.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        if sum(times) > budget_s:
            break
    return min(times)


def table_assignment(args: argparse.Namespace) -> Iterator[dict]:
    """Table 1: distances, solve, reduction and speed relative to scipy, row by row."""
    solvers = [s for s in _linear.available_solvers() if s != "scipy"]
    backend = jax.default_backend()
    for b in args.batches:
        rng = np.random.default_rng(b)
        x = load_images(args.data, b, rng)
        z = rng.standard_normal(x.shape, dtype=np.float32)
        for dtype in args.dtypes:
            opts = {"cost": args.cost, "dtype": dtype, "scale": args.scale}
            dist_fn = functools.partial(_cost.matrix, x, z, **opts)
            c = dist_fn()[0]
            c64 = c.astype(np.float64)
            fns = {"scipy": functools.partial(_linear.solve, c64, "scipy")}
            fns |= {s: functools.partial(_linear.solve, c, s) for s in solvers}
            e2e = {  # Everything assign() does: checks, distances, solve.
                s: functools.partial(assignment.permutation, x, z, "linear", solver=s, **opts)
                for s in ("scipy", "auto")
            }
            times = {name: [] for name in ["dist", *fns, *e2e]}
            for fn in (dist_fn, *fns.values(), *e2e.values()):
                fn()  # Warm-up: imports, thread pools, first-touch memory.
            for _ in range(args.repeats):  # Interleaved repeats.
                times["dist"].append(wall_time(dist_fn))
                for name, fn in (fns | e2e).items():
                    times[name].append(wall_time(fn))
            dist = min(times["dist"])
            scipy_s = min(times["scipy"])
            perm = _linear.solve(c, "auto")
            red = _diagnostics.distance_stats(x, z, z[perm])["reduction"]
            for name in fns:
                solve = min(times[name])
                yield dict(
                    batch=b, dtype=dtype, method="linear", solver=name, dist=dist,
                    solve=solve, total=dist + solve, reduction=red, vs_solve=scipy_s / solve,
                    vs_total=(dist + scipy_s) / (dist + solve),
                )  # fmt: skip
            yield dict(
                batch=b, dtype=dtype, method="linear", solver="auto, end to end",
                dist=NAN, solve=NAN, total=min(times["auto"]), reduction=red, vs_solve=NAN,
                vs_total=min(times["scipy"]) / min(times["auto"]),
            )  # fmt: skip
            for k in args.knn:
                draw_fn = functools.partial(_knn.knn_candidates, z, k, rng)
                draw = best_time(draw_fn, args.repeats)
                cand = draw_fn()
                pick_fn = functools.partial(_knn.nearest, x, cand, **opts)
                pick = best_time(pick_fn, args.repeats)
                red = _diagnostics.distance_stats(x, z, cand[np.arange(b), pick_fn()])["reduction"]
                yield dict(
                    batch=b, dtype=dtype, method=f"knn k={k}", solver="host",
                    dist=draw + pick,
                    solve=NAN, total=draw + pick, reduction=red, vs_solve=NAN,
                    vs_total=(dist + scipy_s) / (draw + pick),
                )  # fmt: skip
            yield from _device_rows(x, z, b, dtype, opts, args, dist + scipy_s, backend)


def _device_rows(x, z, b, dtype, opts, args, scipy_total, backend) -> Iterator[dict]:
    xd, zd = jax.device_put(x), jax.device_put(z)
    dist_fn = jax.jit(functools.partial(_device.device_cost_matrix, **opts))
    c = dist_fn(xd, zd).block_until_ready()
    dist = best_time(lambda: dist_fn(xd, zd), args.repeats)
    if backend != "cpu":  # The authors' layout: distances on the GPU, solver on the host.
        c_host = np.asarray(c)
        fetch = best_time(lambda: np.asarray(dist_fn(xd, zd)), args.repeats)
        solve = best_time(lambda: _linear.solve(c_host, "auto"), args.repeats)
        solver = _linear.resolve_solver("auto")
        yield dict(
            batch=b, dtype=dtype, method="linear", solver=f"{backend} dist+{solver}",
            dist=fetch, solve=solve, total=fetch + solve, reduction=NAN, vs_solve=NAN,
            vs_total=scipy_total / (fetch + solve),
        )  # fmt: skip
    if b <= args.device_max_batch:
        hungarian = jax.jit(optax_hungarian)
        rows, cols = jax.device_get(hungarian(c))
        solve = best_time(lambda: hungarian(c)[1], args.repeats, budget_s=5.0)
        perm = np.empty(b, np.int64)
        perm[rows] = cols
        red = _diagnostics.distance_stats(x, z, z[perm])["reduction"]
        yield dict(
            batch=b, dtype=dtype, method="linear", solver=f"optax ({backend}, jit)",
            dist=dist, solve=solve, total=dist + solve, reduction=red, vs_solve=NAN,
            vs_total=scipy_total / (dist + solve),
        )  # fmt: skip
    for k in args.knn:
        fn = jax.jit(functools.partial(assignment.device_assign, method="knn", k=k, **opts))
        call = functools.partial(fn, xd, zd, key=jax.random.key(0))
        out = np.asarray(call())
        total = best_time(call, args.repeats)
        red = _diagnostics.distance_stats(x, z, out)["reduction"]
        yield dict(
            batch=b, dtype=dtype, method=f"knn k={k}", solver=f"{backend}, jit", dist=total,
            solve=NAN, total=total, reduction=red, vs_solve=NAN, vs_total=scipy_total / total,
        )  # fmt: skip


def optax_hungarian(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    import optax

    return optax.assignment.hungarian_algorithm(c)


def print_table(rows: Iterable[dict], title: str) -> None:
    """Prints each row as soon as it is measured."""
    print(title, flush=True)
    head = (
        f"{'batch':>5} {'dtype':>8} {'method':<9} {'solver':<22} {'dist ms':>8} "
        f"{'solve ms':>9} {'total ms':>9} {'reduct %':>8} {'x scipy solve':>13} "
        f"{'x scipy total':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = {k: "" if np.isnan(r[k]) else f"{1e3 * r[k]:.1f}" for k in ("dist", "solve", "total")}
        red = "" if np.isnan(r["reduction"]) else f"{100 * r['reduction']:.2f}"
        vs_solve = "" if np.isnan(r["vs_solve"]) else f"{r['vs_solve']:.1f}x"
        print(
            f"{r['batch']:>5} {r['dtype']:>8} {r['method']:<9} {r['solver']:<22} "
            f"{ms['dist']:>8} {ms['solve']:>9} {ms['total']:>9} {red:>8} {vs_solve:>13} "
            f"{r['vs_total']:>12.1f}x",
            flush=True,
        )


TABLES: dict[str, Callable[[argparse.Namespace], Iterable[dict]]] = {
    "assignment": table_assignment,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=sorted(TABLES), default="assignment")
    parser.add_argument(
        "--batches", type=lambda s: [int(v) for v in s.split(",")], default=[128, 256, 512, 1024]
    )
    parser.add_argument(
        "--dtypes", type=lambda s: s.split(","), default=["float32", "float16"]
    )  # bfloat16 too with --dtypes float32,float16,bfloat16
    parser.add_argument("--knn", type=lambda s: [int(v) for v in s.split(",")], default=[4])
    parser.add_argument("--cost", default="l2", choices=assignment.COSTS)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--data", default="digits", help="digits | uniform | PATH.npz")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--device-max-batch", type=int, default=1024, help="largest batch for optax's Hungarian"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = TABLES[args.table](args)
    print_table(
        rows,
        f"table {args.table}: images {args.data} {SHAPE}, cost {args.cost}, scale {args.scale}, "
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, auto solver = {_linear.resolve_solver('auto')}",
    )
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
