"""What every mode of `main.py` does first, and how its expected failures end.

`begin(mode, config, workdir, ...)` joins the processes of a multi-host run, turns on
the persistent compilation cache, builds and checks the config once, refuses a command
that cannot run before anything (even the log) is written in the workdir, then opens
the log there. `run(fn)` turns the expected failures (`USER_ERRORS`) into one line on
stderr and an exit status, and a preemption into its own status.
"""

import sys
from collections.abc import Callable
from typing import Any

from absl import logging

EXIT_USAGE = 2  # the command, its config or its workdir is wrong; nothing was done
MODES = ("train", "sample", "eval", "fid_stats", "encode", "train_ae")


def user_errors() -> dict[type[Exception], int]:
    """Expected failures (one clear line, no traceback) and their exit statuses."""
    from cm import data
    from cm.config import ConfigError
    from cm.runtime import checkpoints, run_lock, workdir

    return {ConfigError: EXIT_USAGE, workdir.IncompatibleWorkdirError: EXIT_USAGE,
            workdir.WorkdirNotWritableError: EXIT_USAGE,
            run_lock.WorkdirLockedError: EXIT_USAGE,
            FileNotFoundError: 1, data.DatasetError: 1, FloatingPointError: 1,
            checkpoints.CheckpointError: 1}


def begin(mode: str, config: Any, run_dir: str, distributed_config: Any,
          cache_dir: str | None) -> Any:
    """Starts a mode: processes, compilation cache, the checked config, the log.

    Args:
      mode: one of `MODES`.
      config: the `--config` (a `ConfigDict`) or None.
      run_dir: `--workdir`.
      distributed_config: a `cm.runtime.distributed.DistributedConfig` from the flags.
      cache_dir: the persistent compilation cache's folder, or None for none.

    Returns:
      The built `cm.config.Config` (None when no config was given to sample / eval).
    """
    import jax

    from cm.runtime import distributed  # before anything else touches JAX's devices

    try:
        distributed.initialize(distributed_config)
    except (ValueError, distributed.DistributedInitError) as e:
        sys.exit(f"error: {e}")
    jax.config.update("jax_threefry_partitionable", True)
    from cm.runtime import compile_cache

    compile_cache.enable(cache_dir)
    config = _refuse_early(mode, config, run_dir)
    if distributed.is_main():  # the other processes only log warnings, to stderr
        from cm.runtime import workdir

        workdir.make_writable(run_dir)
        logging.get_absl_handler().use_absl_log_file("log", run_dir)
        logging.set_stderrthreshold("info")
    else:
        logging.set_verbosity("warning")
    from cm.runtime import logs

    logs.quiet_libraries()
    return config


def _refuse_early(mode: str, config: Any, run_dir: str) -> Any:
    """Usage errors found before anything (even the log) is written in the workdir."""
    import jax

    from cm import config as config_lib
    from cm import train
    from cm.runtime import run_lock, workdir

    if mode in ("train", "fid_stats", "encode", "train_ae") and config is None:
        raise config_lib.ConfigError(f"--config is required for --mode {mode}")
    if mode == "train":
        config = config_lib.for_training(config)
        train.check_compatible(run_dir, config)  # another shape, parameterisation or loss
        train.check_not_past_end(run_dir, config.training.n_iters)
        if jax.process_count() == 1:  # several processes: train() asks process 0
            run_lock.check_free(run_dir)
        return config
    if mode in ("sample", "eval"):
        workdir.require_run(run_dir)
    return None if config is None else config_lib.build(config)


def run(fn: Callable[[], Any]) -> Any:
    """Calls `fn`; an expected failure exits with one line and its status."""
    from cm.runtime import preemption

    errors = user_errors()
    try:
        return fn()
    except tuple(errors) as e:
        if logging.get_absl_handler().python_handler.stream is not sys.stderr:
            logging.error("%s", e)  # into the workdir's log too
        print(f"error: {e}", file=sys.stderr)
        sys.exit(next(code for kind, code in errors.items() if isinstance(e, kind)))
    except preemption.Preempted as e:  # SIGTERM / SIGINT: logged with its checkpoint
        sys.exit(e.exit_code)
