"""Resume guards on the state's shape, and the end of a run.

The optimizer's chain has a clipping link only when `optim.grad_clip > 0` and a decay
link only when `optim.weight_decay > 0` (`cm.train_step.make_optimizer`), so switching
either on or off changes the saved optimizer state's tree: the checkpoints could not be
restored. Each such field must be refused on relaunch, by name.
"""

import os

import pytest

from cm import train
from cm.config import ConfigError
from cm.runtime import workdir
from tests.helpers import tiny_config

# (field, saved value, new value): each changes the shapes or the tree of the state.
SHAPE_CHANGES = [
    ("optim.grad_clip", 1.0, 0.0),  # the clipping link disappears
    ("optim.weight_decay", 0.0, 1e-4),  # a decay link appears
    ("optim.optimizer", "radam", "adam"),
    ("training.ema_rates", (0.99,), (0.99, 0.999)),  # one more EMA copy
    ("model.nf", 8, 16),
    ("data.image_size", 8, 16),
]


@pytest.mark.parametrize("field, saved, new", SHAPE_CHANGES)
def test_a_change_of_the_states_shape_is_refused_by_name(tmp_path, field, saved, new):
    run_dir = str(tmp_path / "run")
    workdir.write_config(run_dir, tiny_config(**{field: saved}))
    for training in (True, False):
        with pytest.raises(workdir.IncompatibleWorkdirError, match=field.replace(".", r"\.")):
            train.check_compatible(run_dir, tiny_config(**{field: new}), training=training)
    assert train.check_compatible(run_dir, tiny_config(**{field: saved})) == []


def test_a_finished_run_relaunched_with_its_n_iters_is_not_refused(tmp_path):
    run_dir = str(tmp_path)
    os.makedirs(os.path.join(run_dir, "checkpoints", "6"))
    os.makedirs(os.path.join(run_dir, "resume", "4"))
    train.check_not_past_end(run_dir, 6)  # at its end: nothing to do, not an error
    train.check_not_past_end(run_dir, 8)
    with pytest.raises(ConfigError, match="already at step 6"):
        train.check_not_past_end(run_dir, 5)
