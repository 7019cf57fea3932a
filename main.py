"""Consistency models with immiscible noise assignment: flags and dispatch only.

  python main.py --config configs/quickstart.py --workdir runs/quickstart --mode train
  python main.py --config configs/cifar10_ct.py --workdir runs/ct --config.assignment.method=linear
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (append :smoke to shrink it).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples. Resumes.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "fid_stats"], "What to do.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("log", FLAGS.workdir)
    logging.set_stderrthreshold("info")
    from cm import logs

    logs.quiet_libraries()

    import jax

    jax.config.update("jax_threefry_partitionable", True)
    config = FLAGS.config
    if FLAGS.mode == "train":
        from cm import train

        if config is None:
            raise app.UsageError("--config is required for --mode train")
        train.train(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        from cm import sample_run

        sample_run.sample_from_workdir(FLAGS.workdir, config)
    elif FLAGS.mode == "eval":
        from evaluation import run as eval_run

        eval_run.evaluate(FLAGS.workdir, config)
    elif FLAGS.mode == "fid_stats":
        from evaluation import run as eval_run

        if config is None:
            raise app.UsageError("--config is required for --mode fid_stats")
        eval_run.reference_stats(config, FLAGS.workdir)


def _check_flags(argv: list[str]) -> None:
    """Parses the flags and loads the config up front, so that a mistyped field or a
    missing config file is one clear line, before anything is written."""
    try:
        FLAGS(argv)
        if FLAGS.config is not None:
            _ = FLAGS.config.data  # a config file that failed to load raises on first use
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"error in --config or its overrides: {msg}")


def run():
    _check_flags(sys.argv)
    app.run(main)


if __name__ == "__main__":
    run()
