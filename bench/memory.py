"""The train step's memory at the config's global batch, per microbatch count, remat and
dtype: compiled, never run (XLA's buffer assignment, `compile().memory_analysis()`).

  python -m bench.memory --config configs/cifar10_ct.py [--microbatch 1,2,4,8]
      [--remat off,on] [--dtype float32,bfloat16] [--devices 1]

Prints one row per combination: arguments (state, batch, frozen weights), outputs that
are not donated back, scratch (temporaries) and their sum, as the backend's compiler
assigns them; and, backend-independent, the activations the loss keeps for its backward
pass ("saved", JAX's saved residuals of one microbatch on one device: the part of the
step's memory that microbatches and remat cut). "fits" is judged on arguments + saved +
one copy of the parameters' gradients (24 / 48 / 80 GB, 10% left for the framework): an
estimate of what a GPU needs, since XLA:CPU's scratch does not reflect rematerialisation
(it keeps the activations that remat recomputes: docs/memory.md). The figures are for
ONE device holding the whole global batch (`--devices`: split over that many).
`--compile=false` skips the compile (seconds instead of a minute per row).
`:smoke` configs make it a seconds-long run (the test does that).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cm import config as config_lib
from cm import train_step
from cm.setup import Setup

GIB = 1024**3
SIZES_GB = (24, 48, 80)
USABLE = 0.9  # of a card's memory left to the step (CUDA context, allocator slack)


def load_config(spec: str):
    """`path/to/config.py[:arg]` -> its `get_config(arg)`, as `main.py --config` reads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def step_memory(config, microbatch: int, remat: bool, dtype: str, devices: int,
                compile_step: bool = True):
    """(the compiled step's `memory_analysis()` or None, saved-activation bytes, argument
    bytes) for these settings (nothing runs)."""
    config = config.copy_and_resolve_references()
    config.training.microbatch = microbatch
    config.model.remat = remat
    config.model.dtype = dtype
    setup = Setup(config)
    cfg = setup.config
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                         jax.eval_shape(setup._make_state, setup.init_key))  # noqa: SLF001
    b, s, c = cfg.training.batch_size, cfg.data.image_size, cfg.data.num_channels
    batch = {k: jax.ShapeDtypeStruct((b, s, s, c), np.float32, sharding=sharded)
             for k in ("x", "z")}
    if cfg.model.num_classes > 0:
        batch["label"] = jax.ShapeDtypeStruct((b,), np.int32, sharding=sharded)
    frozen, teacher_apply = {"step_key": jax.ShapeDtypeStruct((2,), np.uint32,
                                                              sharding=replicated)}, None
    wanted = setup.objective.frozen_inputs(cfg.cm)
    if "teacher" in wanted:  # a teacher of the student's shape
        teacher_apply, frozen["teacher"] = setup.apply_fn, state.params
    if "lpips" in wanted:
        from cm.nets import lpips

        frozen["lpips"] = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
            jax.eval_shape(lambda: lpips.init_variables(jax.random.PRNGKey(0))))
    saved = saved_activations(setup, state, frozen, teacher_apply, b // devices // microbatch)
    args = sum(_bytes(a) for a in jax.tree.leaves((state, batch, frozen)))
    if not compile_step:
        return None, saved, args
    step = train_step.make_train_step(setup.apply_fn, cfg.cm, setup.objective, setup.tx,
                                      cfg.training.rates, mesh, teacher_apply_fn=teacher_apply,
                                      microbatches=microbatch)
    return step.lower(state, batch, frozen).compile().memory_analysis(), saved, args


def _bytes(a) -> int:
    return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize


def saved_activations(setup, state, frozen, teacher_apply, rows: int) -> int:
    """Bytes the objective's loss keeps for its backward pass on `rows` examples (JAX's
    saved residuals, the parameters and inputs left out): backend-independent."""
    from jax._src.ad_checkpoint import saved_residuals  # JAX's own accounting (private)

    cfg = setup.config
    s, c = cfg.data.image_size, cfg.data.num_channels
    x = jax.ShapeDtypeStruct((rows, s, s, c), np.float32)
    keys = jax.ShapeDtypeStruct((rows, 2), np.uint32)
    labels = (jax.ShapeDtypeStruct((rows,), np.int32) if cfg.model.num_classes > 0 else None)
    extra = {name: frozen[k] for k, name in train_step.FROZEN_ARGS.items() if k in frozen}
    loss = setup.objective.loss
    if teacher_apply is not None:
        loss = functools.partial(loss, teacher_apply_fn=teacher_apply)

    def f(params, target, extra, x, z, keys, labels):
        return loss(setup.apply_fn, cfg.cm, params, target, x, z, np.int32(0), keys,
                    jax.random.PRNGKey(0), labels, **extra)[0]

    res = saved_residuals(f, state.params, state.target_params, extra, x, x, keys, labels)
    return sum(_bytes(a) for a, where in res if "argument" not in where)


def fits(total_bytes: float) -> str:
    ok = [f"{g}" for g in SIZES_GB if total_bytes <= USABLE * g * 1e9]
    return "/".join(ok) + " GB" if ok else "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (optionally :smoke)")
    p.add_argument("--microbatch", default="1,2,4,8")
    p.add_argument("--remat", default="off,on")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    config = load_config(args.config)
    cfg = config_lib.build(config)
    print(f"# {args.config}: {cfg.objective.name}, {cfg.model.name}, global batch "
          f"{cfg.training.batch_size} over {args.devices} device(s), backend "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
    print("| microbatch | remat | dtype | arguments GiB | saved GiB | fits (est.) | "
          f"{jax.default_backend()} outputs GiB | {jax.default_backend()} scratch GiB | "
          f"{jax.default_backend()} total GiB | s |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for dtype in args.dtype.split(","):
        for remat in args.remat.split(","):
            for m in (int(v) for v in args.microbatch.split(",")):
                t0 = time.perf_counter()
                try:
                    mem, saved, arg_bytes = step_memory(config, m, remat == "on", dtype,
                                                        args.devices, args.compile)
                except config_lib.ConfigError as e:
                    print(f"| {m} | {remat} | {dtype} | refused: {e} ||||||", flush=True)
                    continue
                grads = sum(_bytes(a) for a in jax.tree.leaves(
                    jax.eval_shape(Setup(config)._make_state,  # noqa: SLF001
                                   jax.random.PRNGKey(0)).params))
                row = (f"| {m} | {remat} | {dtype} | {arg_bytes / GIB:.2f} | "
                       f"{saved / GIB:.2f} | {fits(arg_bytes + saved + grads)} |")
                if mem is None:
                    row += " - | - | - |"
                else:
                    out = mem.output_size_in_bytes - mem.alias_size_in_bytes
                    total = mem.argument_size_in_bytes + out + mem.temp_size_in_bytes
                    row += (f" {out / GIB:.2f} | {mem.temp_size_in_bytes / GIB:.2f} | "
                            f"{total / GIB:.2f} |")
                print(f"{row} {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
