"""A diverged run: two resume checkpoints kept (the newest may already be diverging), a
message that names only checkpoints that exist and says how to go on."""

import os
import re
import shutil

import jax
import numpy as np
import pytest

from cm import train
from cm.runtime import checkpoints
from cm.setup import Setup
from tests.helpers import tiny_config

BASE = {"training.n_iters": 8, "training.snapshot_every": 0, "training.resume_every": 1,
        "optim.warmup": 0}


def steps_in(run_dir):
    ckpt = checkpoints.Checkpointer(run_dir)
    out = sorted(ckpt.resume.all_steps()), ckpt.snapshot_steps()
    ckpt.close()
    return out


def test_divergence_keeps_an_older_checkpoint_to_fall_back_to(tmp_path):
    run_dir = str(tmp_path)
    train.train(tiny_config(**BASE), run_dir, stop_after=3)
    assert steps_in(run_dir) == ([1, 2], [3])  # two resume checkpoints, not one
    # The learning rate explodes: step 4's loss is still finite, but its update is not
    # (the resume checkpoint of step 4 holds diverged parameters); step 5's loss is NaN.
    with pytest.raises(FloatingPointError, match="at step 5") as info:
        train.train(tiny_config(**{**BASE, "optim.lr": 1e38}), run_dir)
    message = str(info.value)
    assert steps_in(run_dir) == ([2, 4], [3])
    assert "resume steps [2, 4], snapshots [3]" in message
    assert "resumes from step 4" in message and "--config.optim.lr" in message
    bad = os.path.join(run_dir, "resume", "4")
    assert f"to resume from step 3 instead, first move {bad} out" in message
    ckpt = checkpoints.Checkpointer(run_dir)
    params = ckpt.restore(Setup(tiny_config(**BASE)).abstract_state(), 4).params
    ckpt.close()
    assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params)) > 1e4
    # Doing what it says, the next run starts from step 3's finite parameters.
    shutil.move(bad, str(tmp_path.parent / "diverged_step_4"))
    ckpt = checkpoints.Checkpointer(run_dir)
    step, state = ckpt.restore_newest(Setup(tiny_config(**BASE)).abstract_state())
    ckpt.close()
    assert step == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_divergence_before_any_checkpoint_names_none(tmp_path):
    config = tiny_config(**{**BASE, "training.resume_every": 0, "optim.lr": 1e38})
    with pytest.raises(FloatingPointError) as info:
        train.train(config, str(tmp_path))
    message = str(info.value)
    assert "No checkpoint was written before it" in message and "--config.optim.lr" in message
    assert not re.search(r"checkpoint \(step \d+\)", message)  # the old "step 0" that never was
    assert steps_in(str(tmp_path)) == ([], [])
