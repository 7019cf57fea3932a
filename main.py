"""Consistency models with immiscible noise assignment: flags and dispatch only.

  python main.py --config configs/quickstart.py --workdir runs/quickstart --mode train
  python main.py --config configs/cifar10_ct.py --workdir runs/ct --config.assignment.method=linear

Several hosts: start one process per host (Slurm's srun, mpirun and TPU pod slices are
detected; see docs/multihost.md), or pass --coordinator_address, --num_processes,
--process_id.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from cm import start

config_flags.DEFINE_config_file("config", None, "Config file (append :smoke to shrink it).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples. Resumes.")
flags.DEFINE_enum("mode", "train", list(start.MODES), "What to do.")
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


def modes() -> dict:
    """Every mode is `fn(config, workdir)`."""
    from cm import autoencoder_train, latent, sample_run, train
    from evaluation import run as eval_run

    return {"train": train.train, "sample": sample_run.sample, "eval": eval_run.evaluate,
            "fid_stats": eval_run.reference_stats, "encode": latent.encode,
            "train_ae": autoencoder_train.train_autoencoder}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cm.runtime.distributed import DistributedConfig

    def go():
        dist = DistributedConfig(
            mode=FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
            timeout_s=FLAGS.initialization_timeout)
        cache = FLAGS.compilation_cache_dir if FLAGS.compilation_cache else None
        config = start.begin(FLAGS.mode, FLAGS.config, FLAGS.workdir, dist, cache)
        modes()[FLAGS.mode](config, FLAGS.workdir)

    start.run(go)


def run():
    """Parses the flags and loads the config up front: a mistyped field or a missing
    config file is one clear line, before anything is written."""
    try:
        rest = FLAGS(sys.argv)
        if FLAGS.config is not None:
            _ = FLAGS.config.data  # a config file that failed to load raises on first use
    except flags.Error as e:
        lines = str(e).strip().splitlines()
        if len(lines) > 1:  # a config file's get_config raised: keep what and where
            lines = [lines[0], lines[-1]]
        sys.exit(print(f"error: {' '.join(lines)}", file=sys.stderr) or start.EXIT_USAGE)
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(print(f"error in --config or its overrides: {msg}", file=sys.stderr)
                 or start.EXIT_USAGE)
    app.run(main, flags_parser=lambda _: rest)  # parsed once, above


if __name__ == "__main__":
    run()
