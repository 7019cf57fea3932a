"""Options that would destroy work or memory are refused, with what to do instead."""

import os
import subprocess
import sys

import pytest

from cm import checkpoints, pairing, train, workdir
from cm.setup import Setup
from configs import base, quickstart
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_keep_snapshots_zero_is_refused():
    # orbax's max_to_keep=0 deletes every snapshot, the last one included.
    with pytest.raises(train.ConfigError, match="keep_snapshots must be >= 1"):
        train.validate(tiny_config(**{"training.keep_snapshots": 0}))
    train.validate(tiny_config(**{"training.keep_snapshots": 1}))


def test_huge_knn_k_is_refused_with_the_limit():
    config = quickstart.get_config()
    config.assignment.method = "knn"
    config.assignment.k = 1_000_000  # 64 images x 64 values x 1e6 candidates: ~30 GiB
    with pytest.raises(train.ConfigError, match=r"needs 30\.5 GiB .* the limit is 4 GiB: "
                                                r"use k <= 131072"):
        train.validate(config)
    config.assignment.k = 131072
    train.validate(config)
    config.assignment.method = "linear"  # k is not used: no limit
    config.assignment.k = 1_000_000
    train.validate(config)
    assert pairing.MAX_KNN_CANDIDATES_GB == 4.0


def test_unknown_config_argument_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown config argument 'smok'"):
        quickstart.get_config("smok")
    assert base.with_arg(quickstart.get_config(), "").training.n_iters == 800
    workdir_ = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/quickstart.py:smok",
         "--config.training.n_iters=1", "--workdir", str(workdir_)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "unknown config argument 'smok'" in result.stderr and "Traceback" not in result.stderr
    assert not workdir_.exists()


def test_n_iters_below_the_runs_step_changes_nothing(tmp_path):
    run_dir = str(tmp_path)
    config = tiny_config(**{"training.n_iters": 6})
    workdir.write_config(run_dir, config)
    ckpt = checkpoints.Checkpointer(run_dir)
    ckpt.save(3, Setup(config).init_state(), force=True)  # a run at step 3
    ckpt.wait()
    ckpt.close()
    before = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    config_text = open(workdir.config_path(run_dir)).read()
    with pytest.raises(train.ConfigError, match="already at step 3, past training.n_iters=2; "
                                                "nothing was changed"):
        train.train(tiny_config(**{"training.n_iters": 2}), run_dir)
    assert open(workdir.config_path(run_dir)).read() == config_text
    after = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    assert after == before
