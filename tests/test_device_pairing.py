"""The on-device assignment path (`assignment.where=device`) inside the training step.

`assignment/` tests `device_assign` on its own and the host path is traced end to end
(test_ddpm.py), but nothing checked that the trainer's step actually pairs each shard's
noise on the device path: a `Pairing` that built no `device_fn` trained vanilla silently.
For linear the reference optimum is scipy's `linear_sum_assignment` on L2 costs computed
here with NumPy, not with the project's cost code; for knn each image's kept noise is no
farther (NumPy L2) than its own drawn noise, which is one of its candidates.

Until 2026-11-30 linear on the device path crashed: optax's Hungarian `while_loop` inside
the step's `shard_map` raised a TypeError (carry types differ in their varying manual axes,
`{V:data}`), so `train.train` with assignment.where=device, method=linear failed at the
first step. The pairing now runs in a `shard_map` of its own (cm/train_step.py).
"""

import dataclasses

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from cm import config as config_lib
from cm import data, objectives, pairing, train_step
from cm import setup as setup_lib
from cm.runtime import distributed
from cm.setup import Setup
from tests.helpers import tiny_config


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_device_path_pairs_each_shard_inside_the_step(method, monkeypatch):
    n_dev = jax.device_count()
    batch_size, per = 8 * n_dev, 8
    config = tiny_config(**{"assignment.method": method, "assignment.where": "device",
                            "assignment.scope": "device", "training.batch_size": batch_size})
    pair = pairing.Pairing(config_lib.build(config).assignment, 0, jax.local_device_count())
    assert pair.options.method == "none", "the host stage must not pair on the device path"

    seen = {}

    def record(shard, x, z):
        seen[int(shard)] = (np.asarray(x), np.asarray(z))

    def recording_loss(apply_fn, cfg, params, target, x, z, step, *args, **kwargs):
        jax.debug.callback(record, jax.lax.axis_index("data"), x, z)
        return original(apply_fn, cfg, params, target, x, z, step, *args, **kwargs)

    objective = objectives.get(config.cm.loss)
    original = objective.loss
    monkeypatch.setitem(objectives.REGISTRY, config.cm.loss,
                        dataclasses.replace(objective, loss=recording_loss))
    setup = Setup(config)
    step = train_step.make_train_step(setup.apply_fn, setup.cm, setup.objective, setup.tx,
                                      (0.99,), setup.mesh, device_assign=pair.device_fn)
    frozen, _ = setup_lib.frozen_inputs(setup)
    raw = data.Batcher(data.load_digits(8), batch_size, seed=0, random_flip=False).batch(0)
    _, metrics = step(setup.init_state(), distributed.shard_batch(raw, setup.mesh), frozen)
    jax.effects_barrier()
    assert np.isfinite(float(metrics["loss"]))
    assert sorted(seen) == list(range(n_dev))

    # The step reports the pairing's distances (the host passes the noise on unpaired):
    # the mean row-wise L2 over the global batch, before and after, in NumPy here.
    xs = raw["x"].reshape(batch_size, -1).astype(np.float64)
    paired = np.concatenate([seen[s][1] for s in range(n_dev)]).reshape(batch_size, -1)
    before = np.linalg.norm(xs - raw["z"].reshape(batch_size, -1), axis=1).mean()
    after = np.linalg.norm(xs - paired, axis=1).mean()
    assert after < before
    assert float(metrics["distance_before"]) == pytest.approx(before, rel=1e-5)
    assert float(metrics["distance_after"]) == pytest.approx(after, rel=1e-5)
    assert float(metrics["reduction"]) == pytest.approx(1 - after / before, rel=1e-4)

    moved = 0
    for shard, (x, z) in seen.items():
        rows = slice(shard * per, (shard + 1) * per)
        np.testing.assert_array_equal(x, raw["x"][rows])  # images untouched
        drawn = raw["z"][rows].reshape(per, -1)
        xf = raw["x"][rows].reshape(per, -1).astype(np.float64)
        kept = z.reshape(per, -1)
        if method == "knn":  # the nearest of candidates that include the drawn noise
            d_kept = np.linalg.norm(xf - kept, axis=1)
            d_drawn = np.linalg.norm(xf - drawn, axis=1)
            assert np.all(d_kept <= d_drawn * (1 + 1e-5) + 1e-5), (d_kept, d_drawn)
            moved += int(np.any(kept != drawn))
            continue
        match = [np.flatnonzero((drawn == r).all(axis=1)) for r in kept]
        assert all(len(m) == 1 for m in match), "each row one of the shard's own noises"
        perm = np.array([m[0] for m in match])
        assert sorted(perm) == list(range(per))
        cost = np.linalg.norm(xf[:, None] - drawn[None].astype(np.float64), axis=-1)
        r, c = linear_sum_assignment(cost)
        assert cost[np.arange(per), perm].sum() == pytest.approx(cost[r, c].sum(), rel=1e-5)
        moved += int(np.any(perm != np.arange(per)))
    assert moved > 0, "no shard's noise was re-paired"


@pytest.mark.parametrize("where", ["device", "host"])
def test_host_stage_measures_nothing_on_the_device_path(where, monkeypatch):
    """On the device path the step measures the pairing; the host used to compute the
    unpaired batch's distances as well, then throw them away (a full pass over each
    batch in the input thread). The host path still measures (the patch is seen)."""
    calls = []

    def counting(x, z_before, z_after):
        calls.append(len(x))
        return {"distance_before": 1.0, "distance_after": 1.0, "reduction": 0.0}

    monkeypatch.setattr(pairing, "distance_stats", counting)
    n_dev = jax.device_count()
    config = tiny_config(**{"assignment.method": "linear", "assignment.where": where,
                            "assignment.scope": "device", "training.batch_size": 8 * n_dev})
    pair = pairing.Pairing(config_lib.build(config).assignment, 0, jax.local_device_count())
    batcher = data.Batcher(data.load_digits(8), 8 * n_dev, seed=0, random_flip=False)
    with pair.inputs(batcher, 0, place=lambda a: a) as inputs:
        item = next(inputs)
    if where == "device":
        assert calls == [] and item["diagnostics"] == [{}]
        np.testing.assert_array_equal(item["batch"]["z"], batcher.batch(0)["z"])
    else:  # one call per batch prepared so far (the pipeline prefetches)
        assert set(calls) == {8 * n_dev} and item["diagnostics"][0]["distance_before"] == 1.0


def test_trainer_logs_the_steps_own_pairing_on_the_device_path(tmp_path):
    """metrics.jsonl carries the in-step distances: nothing from the host (which pairs
    nothing there, so it would report a reduction of 0) overwrites them."""
    import json

    from cm import train

    n_dev = jax.device_count()
    config = tiny_config(**{"assignment.method": "linear", "assignment.where": "device",
                            "assignment.scope": "device", "training.batch_size": 8 * n_dev,
                            "training.n_iters": 2, "training.log_every": 1})
    train.train(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["distance_after"] < r["distance_before"] and r["reduction"] > 0, r
