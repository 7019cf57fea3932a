"""End to end: training, checkpoints, resume, sample grids, multi-device equivalence."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cm import config as config_lib
from cm import data, nets, objectives, sample_run, train, train_step
from cm import optim as optim_lib
from cm import setup as setup_lib
from cm.objectives import consistency
from cm.runtime import checkpoints, distributed, workdir
from cm.runtime.views import CMConfig
from cm.setup import Setup
from tests.helpers import QUICKSTART_NET, tiny_config


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(run_dir, config):
    setup = Setup(config)
    ckpt = checkpoints.Checkpointer(run_dir)
    state = ckpt.restore(setup.abstract_state())
    ckpt.close()
    return jax.device_get(state)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full"))
    # Under the transfer guard: no implicit host<->device copy (a hidden sync) anywhere
    # in the loop, grids and checkpoints included.
    config = tiny_config(**{"training.sample_every": 3, "training.transfer_guard": "disallow"})
    train.train(config, run_dir)
    return run_dir, config


def test_transfer_guard_catches_an_implicit_copy_in_the_loop(tmp_path, monkeypatch):
    def leaky(batch, mesh, **kwargs):  # hands the step host arrays: an implicit copy
        del mesh, kwargs
        return dict(batch)

    monkeypatch.setattr(distributed, "shard_batch", leaky)
    config = tiny_config(**{"training.transfer_guard": "disallow"})
    with pytest.raises(Exception, match="Disallowed host-to-device"):
        train.train(config, str(tmp_path / "guarded"))
    config.training.transfer_guard = "allow"
    assert train.train(config, str(tmp_path / "allowed"))["step"] == 6
    config.training.transfer_guard = "forbid"
    with pytest.raises(ValueError, match="transfer_guard"):
        config_lib.for_training(config)


def test_train_writes_checkpoints_grids_and_metrics(uninterrupted):
    run_dir, config = uninterrupted
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "num_scales", "mu", "images_per_sec", "input_wait_fraction"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == [
        "step_00000003.png",
        "step_00000006.png",
    ]
    assert checkpoints.Checkpointer(run_dir).snapshot_steps() == [3, 6]
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    saved = workdir.load_config(run_dir)
    assert saved.model.ch_mult == (1,) and saved.training.n_iters == 6


def test_resume_is_bitwise_identical(uninterrupted, tmp_path):
    full_dir, config = uninterrupted
    run_dir = str(tmp_path / "resumed")
    config = tiny_config(**{"training.sample_every": 3})
    train.train(config, run_dir, stop_after=4)  # interrupted after step 4
    assert checkpoints.Checkpointer(run_dir).latest_step() == 4
    train.train(config, run_dir)  # resumes at 4
    full, resumed = read_metrics(full_dir), read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    a, b = final_params(full_dir, config), final_params(run_dir, config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sample_mode_writes_npz_and_grid(uninterrupted):
    run_dir, _ = uninterrupted
    config = workdir.load_config(run_dir)
    config.sample.n = 10

    def draw(ts, step=-1):
        config.sample.ts, config.sample.step = ts, step
        path = sample_run.sample(config, run_dir)
        assert os.path.exists(path.replace(".npz", ".png"))
        with np.load(path) as f:
            return f["images"], int(f["step"]), os.path.basename(path)

    two, step, _ = draw((80.0, 0.821))
    assert two.shape == (10, 8, 8, 1) and two.dtype == np.uint8 and step == 6
    # sample.ts and sample.step are obeyed: one step gives other images (the second step
    # adds visible noise to this nearly untrained model's grey), and step 3 its checkpoint.
    one, _, _ = draw((80.0,))
    assert np.abs(one.astype(np.int32) - two).mean() > 2
    _, step, name = draw((80.0, 0.821), step=3)
    assert step == 3 and name == "sample_step00000003_2step.npz"


def test_train_on_mock_cifar10(tmp_path):
    """The CIFAR-10 path (tfds, RGB, flips) with the quickstart's network parts (two
    levels, attention, FIR, residual progressive input): the one end-to-end run of the
    whole architecture; the other runs use tiny_config's one-level network."""
    config = tiny_config(
        **{
            **QUICKSTART_NET,
            "model.attn_resolutions": (16,),
            "data.name": "tfds:cifar10",
            "data.image_size": 32,
            "data.num_channels": 3,
            "data.random_flip": True,
            "training.n_iters": 2,
            "training.snapshot_every": 2,
        }
    )
    with tfds.testing.mock_data(num_examples=24):
        train.train(config, str(tmp_path))
    assert checkpoints.Checkpointer(str(tmp_path)).snapshot_steps() == [2]
    assert os.path.exists(tmp_path / "samples" / "step_00000002.png")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(
        **{"optim.lr": 1e38, "optim.warmup": 0, "training.snapshot_every": 1, "training.n_iters": 5}
    )
    with pytest.raises(FloatingPointError, match=r"at step \d"):
        train.train(config, str(tmp_path))
    steps = checkpoints.Checkpointer(str(tmp_path)).snapshot_steps()
    assert steps, "the last good checkpoint must stay"
    state = final_params(str(tmp_path), config)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_incompatible_workdir_fails_without_touching_it(uninterrupted):
    run_dir, _ = uninterrupted
    before = open(os.path.join(run_dir, "config.json")).read()
    config = tiny_config(**{"model.nf": 16})
    with pytest.raises(workdir.IncompatibleWorkdirError, match="model.nf"):
        train.train(config, run_dir)
    # The loss is part of the run too: resuming with another metric is refused.
    config = tiny_config(**{"training.transfer_guard": "disallow", "cm.metric": "l2"})
    with pytest.raises(workdir.IncompatibleWorkdirError, match="cm.metric"):
        train.train(config, run_dir)
    assert open(os.path.join(run_dir, "config.json")).read() == before


def test_missing_cifar10_says_how_to_prepare(tmp_path):
    config = tiny_config(**{"data.name": "cifar10", "data.data_dir": str(tmp_path),
                            "data.download": False})
    with pytest.raises(data.DatasetError, match="manual"):
        train.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "config.json")


@pytest.mark.parametrize("loss", ["ct", "ict"])
def test_eight_devices_match_one_device(loss):
    """Several steps that move the parameters, with RAdam and clipping on.

    A gradient summed over devices instead of averaged is 8x too large on 8 devices:
    grad_norm, the clipped update (the clip threshold sits above the mean gradient's
    norm and below 8x it) and RAdam's first, un-rectified steps (momentum without the
    second-moment normalisation, so the update scales with the gradient) all see it.
    """
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (conftest)"
    config = tiny_config(**{"cm.loss": loss, "optim.optimizer": "radam", "optim.warmup": 0,
                            "optim.lr": 2e-3, "optim.grad_clip": 15.0})
    config.cm.start_scales, config.cm.end_scales = 10, 40
    cm_cfg = CMConfig.from_config(config)
    module = nets.build_model(config)
    apply_fn = nets.make_apply_fn(module)
    tx = optim_lib.make_optimizer(config.optim)
    params = nets.init_params(module, jax.random.PRNGKey(0), config)
    images = data.load_digits(8)
    batcher = data.Batcher(images, 16, seed=0, random_flip=False)
    n_steps = 4
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = distributed.make_mesh(devices)
        state = train_step.init_state(jax.tree.map(np.array, params), tx,
                                      objectives.get(loss).keeps_target, 1)
        state = jax.device_put(
            state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
        step = train_step.make_train_step(apply_fn, cm_cfg, objectives.get(loss), tx, (0.99,),
                                          mesh)
        frozen = {"step_key": jax.random.PRNGKey(1)}
        rows = []
        for k in range(n_steps):
            state, metrics = step(state, distributed.shard_batch(batcher.batch(k), mesh), frozen)
            rows.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        results.append((jax.device_get(state.params), np.array(rows)))
    (p1, rows1), (p8, rows8) = results
    # The parameters moved, so the comparison below can see a wrong update.
    moved = max(float(np.max(np.abs(a - b)))
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params), strict=True))
    assert moved > 1e-3, moved
    # The clip must matter for an 8x gradient and not for the mean one.
    assert np.all(rows1[:, 1] < 15.0) and rows1[0, 1] * 8 > 15.0, rows1
    np.testing.assert_allclose(rows8[:, 0], rows1[:, 0], rtol=1e-4)  # losses
    np.testing.assert_allclose(rows8[:, 1], rows1[:, 1], rtol=1e-4)  # grad_norm
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_the_seed_is_an_argument_of_the_programs_not_a_constant():
    """Runs that differ only in training.seed compile the same initialisation and train
    step (so the persistent compilation cache serves a seed sweep from its first compile),
    and the seed still reaches both: other initial parameters, another first-step loss."""
    setups = [Setup(tiny_config(**{"training.seed": seed, "optim.warmup": 0}))
              for seed in (0, 1)]
    batch = data.Batcher(data.load_digits(8), 8, seed=0, random_flip=False).batch(0)
    texts, losses, params = [], [], []
    for setup in setups:
        init = jax.jit(setup._make_state, out_shardings=setup.replicated)
        texts.append(init.lower(setup.init_key).as_text())
        state = setup.init_state()
        params.append(jax.device_get(state.params))
        frozen, _ = setup_lib.frozen_inputs(setup)
        step = train_step.make_train_step(setup.apply_fn, setup.cm, setup.objective, setup.tx,
                                          (0.99,), setup.mesh)
        sharded = distributed.shard_batch(batch, setup.mesh)
        texts.append(step.lower(state, sharded, frozen).as_text())
        losses.append(float(step(state, sharded, frozen)[1]["loss"]))
    assert texts[0] == texts[2] and texts[1] == texts[3]  # init, step: one program each
    assert losses[0] != losses[1]
    # The same state and batch with the other seed's step key: another loss (other levels
    # and per-example noise keys), so the key is not just carried along.
    frozen1, _ = setup_lib.frozen_inputs(setups[1])
    state0 = setups[0].init_state()
    sharded = distributed.shard_batch(batch, setups[0].mesh)
    assert float(step(state0, sharded, frozen1)[1]["loss"]) != losses[0]
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(params[0]),
                                              jax.tree.leaves(params[1]), strict=True))


def test_grid_sampler_is_built_once_per_times():
    setup = Setup(tiny_config())
    at = consistency.at_times
    assert setup.sampler(at((80.0,))) is setup.sampler(at([80]))
    assert setup.sampler(at((80.0, 0.821))) is not setup.sampler(at((80.0,)))


def test_saved_config_from_an_older_version_gets_new_fields(tmp_path):
    config = tiny_config()
    workdir.write_config(str(tmp_path), config)
    path = workdir.config_path(str(tmp_path))
    saved = json.load(open(path))
    del saved["data"]["stream"], saved["sample"]["label"]  # fields added later
    json.dump(saved, open(path, "w"))
    loaded = workdir.load_config(str(tmp_path))
    assert loaded.data.stream == "auto" and loaded.sample.label == -1
    assert loaded.model.ch_mult == (1,) and loaded.training.ema_rates == (0.99,)


def test_several_steps_per_call_match_one_step_per_call(uninterrupted, tmp_path):
    """k = 3 steps per jitted call (k batches paired ahead, one unrolled program) trains
    the same run as one step per call, after steps that move the parameters (warmup 2 of
    6 steps). Measured: the first call's losses are bitwise those of k = 1; from the
    second call on they differ in the last bits (XLA compiles the k-step program apart),
    hence float tolerances far below any wrong batch, pairing or step count."""
    full_dir, _ = uninterrupted
    config = tiny_config(**{"training.sample_every": 3, "training.steps_per_call": 3,
                            "training.log_every": 3})
    k3_dir = str(tmp_path / "k3")
    last = train.train(config, k3_dir)
    assert last["step"] == 6
    by_step = {r["step"]: r for r in read_metrics(full_dir)}
    rows = read_metrics(k3_dir)
    assert [r["step"] for r in rows] == [3, 6]
    assert rows[0]["loss"] == by_step[3]["loss"]
    for r in rows:
        assert r["loss"] == pytest.approx(by_step[r["step"]]["loss"], rel=1e-6)
        assert r["grad_norm"] == pytest.approx(by_step[r["step"]]["grad_norm"], rel=1e-5)
    a, b = final_params(full_dir, config), final_params(k3_dir, config)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    moved = final_params(full_dir, config).params
    start = Setup(config).init_state().params
    assert any(np.any(np.asarray(p) != np.asarray(q)) for p, q in
               zip(jax.tree.leaves(moved), jax.tree.leaves(jax.device_get(start)), strict=True))
    config.training.log_every = 2
    with pytest.raises(ValueError, match="multiple of 3"):
        config_lib.for_training(config)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_learning_rate_warmup_then_decay_matches_the_formula(decay):
    """The schedule against the formulas in NumPy: linear warmup 0 -> lr over W steps, then
    lr * (f + (1 - f) * d(t)) with d = (1 + cos(pi t)) / 2 or 1 - t, t = (step - W) / (T - W)."""
    optim = ml_collections.ConfigDict({"lr": 1e-3, "warmup": 100, "decay": decay,
                                       "final_lr": 0.1})
    sched = optim_lib.learning_rate(optim, total_steps=800)
    steps = np.array([0, 50, 100, 101, 300, 450, 799, 800, 900])
    t = np.clip((steps - 100) / 700, 0, 1)
    d = (1 + np.cos(np.pi * t)) / 2 if decay == "cosine" else 1 - t
    want = np.where(steps < 100, 1e-3 * steps / 100, 1e-3 * (0.1 + 0.9 * d))
    got = np.array([float(sched(s)) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert got[-1] == pytest.approx(1e-4)  # ends at final_lr * lr, and stays there


def test_learning_rate_constant_and_bad_settings():
    optim = ml_collections.ConfigDict({"lr": 1e-3, "warmup": 0, "decay": "none",
                                       "final_lr": 0.0})
    assert optim_lib.learning_rate(optim, 800) == 1e-3
    optim.decay = "cosine"
    assert float(optim_lib.learning_rate(optim, 800)(400)) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="more training steps"):
        optim_lib.learning_rate(optim, 0)
    optim.decay = "step"
    with pytest.raises(ValueError, match="optim.decay must be one of"):
        optim_lib.learning_rate(optim, 800)
