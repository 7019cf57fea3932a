"""Options that would destroy work or memory are refused, with what to do instead."""

import os

import pytest

from cm import config as config_lib
from cm import pairing, train
from cm.config import ConfigError
from cm.runtime import checkpoints, workdir
from cm.setup import Setup
from configs import base, quickstart
from tests.helpers import run_main, tiny_config


def test_keep_snapshots_zero_is_refused():
    # orbax's max_to_keep=0 deletes every snapshot, the last one included.
    with pytest.raises(ConfigError, match="keep_snapshots must be >= 1"):
        config_lib.for_training(tiny_config(**{"training.keep_snapshots": 0}))
    config_lib.for_training(tiny_config(**{"training.keep_snapshots": 1}))


def test_huge_knn_k_is_refused_with_the_limit():
    config = quickstart.get_config()
    config.assignment.method = "knn"
    config.assignment.k = 1_000_000  # 64 images x 64 values x 1e6 candidates: ~30 GiB
    with pytest.raises(ConfigError, match=r"needs 30\.5 GiB .* the limit is 4 GiB: "
                                                r"use k <= 131072"):
        config_lib.for_training(config)
    config.assignment.k = 131072
    config_lib.for_training(config)
    config.assignment.method = "linear"  # k is not used: no limit
    config.assignment.k = 1_000_000
    config_lib.for_training(config)
    assert pairing.MAX_KNN_CANDIDATES_GB == 4.0


def test_unknown_config_argument_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown config argument 'smok'"):
        quickstart.get_config("smok")
    assert base.with_arg(quickstart.get_config(), "").training.n_iters == 800
    workdir_ = tmp_path / "run"
    result = run_main("--config", "configs/quickstart.py:smok", "--config.training.n_iters=1",
                      "--workdir", str(workdir_), timeout=300)
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
    with pytest.raises(ConfigError, match="already at step 3, past training.n_iters=2; "
                                                "nothing was changed"):
        train.train(tiny_config(**{"training.n_iters": 2}), run_dir)
    assert open(workdir.config_path(run_dir)).read() == config_text
    after = {name: os.path.getmtime(os.path.join(run_dir, name)) for name in os.listdir(run_dir)}
    assert after == before


def test_listed_steps_agree_with_orbax(tmp_path):
    """`listed_steps` reads folder names (no manager, nothing created); orbax is the
    reference: snapshots and resume checkpoints, with a half-written step beside them."""
    run_dir = str(tmp_path / "run")
    assert checkpoints.listed_steps(run_dir) == [] and not os.path.exists(run_dir)
    state = Setup(tiny_config()).init_state()
    ckpt = checkpoints.Checkpointer(run_dir, keep=2, snapshot_every=4, resume_every=2)
    for step in (2, 4, 6, 8):
        ckpt.save(step, state)
    ckpt.wait()
    os.makedirs(os.path.join(run_dir, "resume", "10.orbax-checkpoint-tmp-1"))
    ckpt.reload()
    expected = ckpt.all_steps()
    ckpt.close()
    assert len(expected) >= 3  # snapshots 4, 8 and resume 6, 8
    assert checkpoints.listed_steps(run_dir) == expected


def test_main_refuses_n_iters_below_the_runs_step_before_writing(tmp_path):
    """main.py refuses before it opens the workdir's log: nothing in it changes."""
    run_dir = tmp_path / "run"
    config = quickstart.get_config("smoke")
    workdir.write_config(str(run_dir), config)
    os.makedirs(run_dir / "checkpoints" / "5")  # what listed_steps reads: a run at step 5
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime) for p in run_dir.rglob("*"))
    result = run_main("--config", "configs/quickstart.py:smoke", "--config.training.n_iters=4",
                      "--workdir", str(run_dir), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "already at step 5, past training.n_iters=4" in result.stderr
    assert "Traceback" not in result.stderr
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime) for p in run_dir.rglob("*"))
    assert after == before
