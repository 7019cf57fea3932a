"""Starting a run from another run's parameters: fine-tuning, refusals, conditional
fine-tunes, and the resume that takes precedence; EDM's EMA half-life."""

import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from cm import config as config_lib
from cm import init_from, train
from cm.runtime import checkpoints
from cm.setup import Setup
from tests.helpers import tiny_config


def host(tree):
    return jax.device_get(tree)


def flat(tree):
    return traverse_util.flatten_dict(host(tree), sep="/")


def restore(run_dir, config):
    ckpt = checkpoints.Checkpointer(run_dir)
    state = ckpt.restore(Setup(config).abstract_state())
    ckpt.close()
    return host(state)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny CT run (it has a target network) trained for 3 steps."""
    run_dir = str(tmp_path_factory.mktemp("source"))
    config = tiny_config(**{"cm.loss": "ct", "cm.metric": "l2", "training.n_iters": 3,
                            "optim.warmup": 0, "training.ema_rates": (0.9, 0.5)})
    train.train(config, run_dir)
    return run_dir, config, restore(run_dir, config)


def finetune_config(src_dir, **overrides):
    return tiny_config(**{"cm.loss": "ct", "cm.metric": "l2", "training.init_from": src_dir,
                          "optim.warmup": 0, "training.ema_rates": (0.9, 0.5), **overrides})


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_new_run_starts_from_the_other_runs_parameters(source_run):
    src_dir, _, src = source_run
    config = finetune_config(src_dir)
    start = init_from.initial_state(config, Setup(config))
    assert int(start.step) == 0
    assert_trees_equal(start.params, src.params)
    assert_trees_equal(start.target_params, src.target_params)
    assert_trees_equal(start.ema_params, src.ema_params)
    # The source moved away from a fresh initialisation, so equality above means copied.
    fresh = host(Setup(config).init_state())
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(fresh.params),
                                              jax.tree.leaves(src.params), strict=True))
    # A fresh optimiser: Adam/RAdam moments at zero, not the source's.
    assert all(np.all(np.asarray(m) == 0) for m in jax.tree.leaves(start.opt_state)
               if np.asarray(m).ndim > 0)
    assert any(np.any(np.asarray(m) != 0) for m in jax.tree.leaves(src.opt_state)
               if np.asarray(m).ndim > 0)


def test_mismatched_shapes_are_refused_naming_the_parameter(source_run, tmp_path):
    src_dir, _, _ = source_run
    config = finetune_config(src_dir, **{"model.nf": 16})
    with pytest.raises(init_from.InitFromError, match=r"parameter '.+' has shape"):
        train.train(config, str(tmp_path / "wide"))


def test_class_conditional_finetune_of_an_unconditional_run(source_run):
    src_dir, _, src = source_run
    config = finetune_config(src_dir, **{"model.num_classes": 10})
    start = init_from.initial_state(config, Setup(config))
    got, want = flat(start.params), flat(src.params)
    new = sorted(set(got) - set(want))
    assert new and all("Embed" in name for name in new), new
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    # Each EMA copies the source's EMA, with the same new leaves added.
    for ema, src_ema in zip(start.ema_params, src.ema_params, strict=True):
        e, s = flat(ema), flat(src_ema)
        assert sorted(set(e) - set(s)) == new
        for name in s:
            np.testing.assert_array_equal(e[name], s[name])
    # The other way round (a conditional source into an unconditional model) is refused.
    with pytest.raises(init_from.InitFromError, match="lacks"):
        init_from.merge_params(host(src.params), host(start.params), allow_new=False,
                               where="x")


def test_a_workdir_with_its_own_checkpoint_resumes_and_ignores_init_from(source_run, tmp_path):
    src_dir, _, src = source_run
    run_dir = str(tmp_path / "own")
    own = tiny_config(**{"cm.loss": "ct", "cm.metric": "l2", "training.n_iters": 3,
                         "optim.warmup": 0, "training.ema_rates": (0.9, 0.5),
                         "training.seed": 5})
    train.train(own, run_dir)
    before = restore(run_dir, own)
    config = finetune_config(src_dir, **{"training.n_iters": 4, "training.seed": 5})
    assert train.train(config, run_dir)["step"] == 4  # resumed at 3, one more step
    after = restore(run_dir, config)
    # One step from its own state: closer to its own parameters than to the source's.
    own_gap = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(after.params), jax.tree.leaves(before.params), strict=True))
    src_gap = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(after.params), jax.tree.leaves(src.params), strict=True))
    assert own_gap < src_gap


def test_a_missing_source_or_step_is_a_clear_error(source_run, tmp_path):
    src_dir, _, _ = source_run
    config = finetune_config(str(tmp_path / "nothing"))
    with pytest.raises(init_from.InitFromError, match="cannot start from"):
        init_from.initial_state(config, Setup(config))
    config = finetune_config(src_dir, **{"training.init_step": 7})
    with pytest.raises(init_from.InitFromError, match="no checkpoint at step 7"):
        init_from.initial_state(config, Setup(config))


def test_ema_halflife_in_kimg_follows_the_global_batch():
    config = tiny_config(**{"training.ema_halflife_kimg": 500.0, "training.batch_size": 512,
                            "training.ema_rates": (0.9999, 0.5)})
    rates = config_lib.build(config).training.rates
    # EDM: the EMA's weight halves every 500k images = 500e3 / 512 steps.
    assert rates[0] == pytest.approx(math.exp(math.log(0.5) / (500e3 / 512)), rel=1e-12)
    assert round(rates[0], 5) == 0.99929 and rates[1] == 0.5
    config.training.ema_halflife_kimg = 0.0
    assert config_lib.build(config).training.rates == (0.9999, 0.5)
