"""Gradient accumulation (`training.microbatch`) and rematerialisation (`model.remat`):
the same training, less memory.

1 vs 4 microbatches, over steps that move the parameters with RAdam and clipping on, on 8
devices and with 2 steps per call: the same losses, grad norms and parameters (float
rounding), and the loss sees the same (image, noise) pairs, because the global batch is
paired first and then cut.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from cm import config as config_lib
from cm import objectives, train
from cm.runtime import checkpoints
from cm.setup import Setup
from tests.helpers import tiny_config

BASE = {"training.batch_size": 32, "training.n_iters": 4, "training.snapshot_every": 4,
        "optim.optimizer": "radam", "optim.warmup": 0, "optim.lr": 2e-3,
        "optim.grad_clip": 5.0, "assignment.method": "linear", "assignment.scope": "global",
        "cm.start_scales": 10, "cm.end_scales": 40}


def _run(tmp_path, name, monkeypatch, **overrides):
    """Trains the tiny config; returns (metrics rows, final state, {step: z rows seen})."""
    seen: dict[int, list] = {}
    objective = objectives.get("ict")
    original = objective.loss

    def record(step, shard, x, z):
        seen.setdefault(int(step), []).append((int(shard), np.asarray(x), np.asarray(z)))

    def recording(apply_fn, cfg, params, target, x, z, step, *args, **kwargs):
        jax.debug.callback(record, step, jax.lax.axis_index("data"), x, z, ordered=False)
        return original(apply_fn, cfg, params, target, x, z, step, *args, **kwargs)

    monkeypatch.setitem(objectives.REGISTRY, "ict",
                        dataclasses.replace(objective, loss=recording))
    config = tiny_config(**{**BASE, **overrides})
    run_dir = str(tmp_path / name)
    train.train(config, run_dir)
    jax.effects_barrier()
    monkeypatch.undo()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    ckpt = checkpoints.Checkpointer(run_dir)
    state = jax.device_get(ckpt.restore(Setup(config).abstract_state()))
    ckpt.close()
    pairs = {}
    for step, parts in seen.items():  # in row order: device, then microbatch within it
        parts = sorted(parts, key=lambda p: p[0])
        pairs[step] = (np.concatenate([p[1] for p in parts]),
                       np.concatenate([p[2] for p in parts]))
    return rows, state, pairs


def test_four_microbatches_train_as_one(tmp_path, monkeypatch):
    rows1, state1, pairs1 = _run(tmp_path, "m1", monkeypatch)
    rows4, state4, pairs4 = _run(tmp_path, "m4", monkeypatch, **{
        "training.microbatch": 4, "training.steps_per_call": 2, "training.log_every": 2})
    by_step = {r["step"]: r for r in rows1}
    assert [r["step"] for r in rows4] == [2, 4]
    for r in rows4:
        assert r["loss"] == pytest.approx(by_step[r["step"]]["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(by_step[r["step"]]["grad_norm"], rel=1e-5)
    # The clip (5.0) is active at the first step: a gradient mis-scaled by the number of
    # microbatches would be clipped differently and move the parameters elsewhere.
    assert by_step[1]["grad_norm"] > 5.0
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state4.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved = max(float(np.abs(a).max()) for a in jax.tree.leaves(
        jax.tree.map(lambda p, q: p - q, state1.params,
                     jax.device_get(Setup(tiny_config(**BASE)).init_state().params))))
    assert moved > 1e-3
    # The loss saw the same pairs: each microbatch a slice of the globally paired batch.
    assert sorted(pairs1) == sorted(pairs4) == [0, 1, 2, 3]
    for step in pairs1:
        np.testing.assert_array_equal(pairs1[step][0], pairs4[step][0])
        np.testing.assert_array_equal(pairs1[step][1], pairs4[step][1])


def test_microbatches_must_split_each_devices_rows():
    config = tiny_config(**{**BASE, "training.microbatch": 3})
    with pytest.raises(config_lib.ConfigError, match="microbatch"):
        config_lib.for_training(config)


@pytest.mark.parametrize("net", ["ncsnpp", "ddpm_unet"])
def test_remat_gives_the_same_gradients_and_parameter_names(net):
    """The loss's gradient with the blocks rematerialised equals the plain one (float
    rounding), the parameter tree is the same (a checkpoint restores either way), and the
    backward pass keeps fewer activations (JAX's saved residuals), so remat is on."""
    from jax._src.ad_checkpoint import saved_residuals

    from cm import nets

    results = []
    for remat in (False, True):
        config = tiny_config(**{"model.name": net, "model.attn_resolutions": (8,),
                                "model.remat": remat})
        module = nets.build_model(config)
        apply_fn = nets.make_apply_fn(module)
        params = nets.init_params(module, jax.random.PRNGKey(0), config)
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
        t = jax.numpy.linspace(0.1, 2.0, 4)

        def loss(p, x=x, t=t, apply_fn=apply_fn):
            out = apply_fn(p, x, t, None, True, jax.random.PRNGKey(2))
            return jax.numpy.mean(out**2)

        grads = jax.jit(jax.grad(loss))(params)
        kept = sum(int(np.prod(a.shape)) for a, where in saved_residuals(loss, params)
                   if "argument" not in where)
        results.append((params, grads, kept))
    (p0, g0, kept0), (p1, g1, kept1) = results
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert kept1 < 0.6 * kept0, (kept1, kept0)
