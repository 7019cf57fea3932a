"""Consistency models with immiscible noise assignment: flags and dispatch only.

  python main.py --config configs/quickstart.py --workdir runs/quickstart --mode train
  python main.py --config configs/cifar10_ct.py --workdir runs/ct --config.assignment.method=linear

Several hosts: start one process per host (Slurm's srun, mpirun and TPU pod slices are
detected; see the README), or pass --coordinator_address, --num_processes, --process_id.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (append :smoke to shrink it).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples. Resumes.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "fid_stats"], "What to do.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Multi-host start: auto = when the flags below or a cluster launcher "
                  "(Slurm, Open MPI, TPU worker list) say so; on = always "
                  "jax.distributed.initialize() (e.g. TPU pod slices); off = one process.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("initialization_timeout", 300,
                     "Seconds to wait for all processes to connect before failing.")
flags.DEFINE_bool("compilation_cache", True,
                  "Keep compiled programs in --compilation_cache_dir, so that a relaunch of "
                  "the same config skips compiling (--nocompilation_cache: off).")
flags.DEFINE_string("compilation_cache_dir", "~/.cache/immiscible_cm/jax_cache",
                    "Where the persistent compilation cache lives (JAX's own format).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


EXIT_USAGE = 2  # the command, its config or its workdir is wrong; nothing was done


def _user_errors() -> dict[type[Exception], int]:
    """Expected failures (one clear line, no traceback) and their exit statuses."""
    from cm import checkpoints, data, run_lock, train, workdir

    return {train.ConfigError: EXIT_USAGE, workdir.IncompatibleWorkdirError: EXIT_USAGE,
            workdir.WorkdirNotWritableError: EXIT_USAGE,
            run_lock.WorkdirLockedError: EXIT_USAGE,
            FileNotFoundError: 1, data.DatasetError: 1, FloatingPointError: 1,
            checkpoints.CheckpointError: 1}


def main(argv):
    from cm import preemption

    errors = _user_errors()
    try:
        dispatch(argv)
    except tuple(errors) as e:
        if logging.get_absl_handler().python_handler.stream is not sys.stderr:
            logging.error("%s", e)  # into the workdir's log too
        print(f"error: {e}", file=sys.stderr)
        sys.exit(next(code for kind, code in errors.items() if isinstance(e, kind)))
    except preemption.Preempted as e:  # SIGTERM / SIGINT: logged with its checkpoint
        sys.exit(e.exit_code)


def dispatch(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from cm import distributed  # before anything else touches JAX's devices

    try:
        distributed.initialize(distributed.DistributedConfig(
            mode=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
            timeout_s=FLAGS.initialization_timeout))
    except (ValueError, distributed.DistributedInitError) as e:
        sys.exit(f"error: {e}")
    jax.config.update("jax_threefry_partitionable", True)
    from cm import compile_cache

    compile_cache.enable(FLAGS.compilation_cache_dir if FLAGS.compilation_cache else None)
    config = FLAGS.config
    _refuse_early(FLAGS.mode, config, FLAGS.workdir)
    if distributed.is_main():  # the other processes only log warnings, to stderr
        from cm import workdir

        workdir.make_writable(FLAGS.workdir)
        logging.get_absl_handler().use_absl_log_file("log", FLAGS.workdir)
        logging.set_stderrthreshold("info")
    else:
        logging.set_verbosity("warning")
    from cm import logs

    logs.quiet_libraries()
    if FLAGS.mode == "train":
        from cm import train

        train.train(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        from cm import sample_run

        sample_run.sample_from_workdir(FLAGS.workdir, config)
    elif FLAGS.mode == "eval":
        from evaluation import run as eval_run

        eval_run.evaluate(FLAGS.workdir, config)
    elif FLAGS.mode == "fid_stats":
        from evaluation import run as eval_run

        eval_run.reference_stats(config, FLAGS.workdir)


def _refuse_early(mode: str, config, run_dir: str) -> None:
    """Usage errors found before anything (even the log) is written in the workdir."""
    import jax

    from cm import run_lock, train, workdir

    if mode in ("train", "fid_stats") and config is None:
        raise train.ConfigError(f"--config is required for --mode {mode}")
    if mode == "train":
        train.validate(config)
        workdir.check_compatible(run_dir, config)  # another shape, parameterisation or loss
        train.check_not_past_end(run_dir, config.training.n_iters)
        if jax.process_count() == 1:  # several processes: train() asks process 0
            run_lock.check_free(run_dir)
    elif mode in ("sample", "eval"):
        workdir.require_run(run_dir)


def _check_flags(argv: list[str]) -> list[str]:
    """Parses the flags and loads the config up front, so that a mistyped field or a
    missing config file is one clear line, before anything is written."""
    try:
        rest = FLAGS(argv)
        if FLAGS.config is not None:
            _ = FLAGS.config.data  # a config file that failed to load raises on first use
    except flags.Error as e:
        lines = str(e).strip().splitlines()
        if len(lines) > 1:  # a config file's get_config raised: keep what and where
            lines = [lines[0], lines[-1]]
        print(f"error: {' '.join(lines)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        print(f"error in --config or its overrides: {msg}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return rest


def run():
    rest = _check_flags(sys.argv)
    app.run(main, flags_parser=lambda _: rest)  # parsed once, above


if __name__ == "__main__":
    run()
