"""Mixed precision: `model.dtype = "bfloat16"` computes activations and matmuls in bf16
while parameters, optimizer state, loss and gradients stay float32, and one bf16 train
step stays close to the float32 step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm import data, nets, objectives, optim, train_step
from cm.runtime import distributed
from cm.runtime.views import CMConfig
from tests.helpers import tiny_config


def one_step(dtype: str, params, batch):
    config = tiny_config(**{"model.dtype": dtype, "optim.optimizer": "radam",
                            "optim.warmup": 0})
    # One level with attention: every kind of layer, at a fraction of tiny_config's compile.
    config.model.ch_mult, config.model.attn_resolutions = (1,), (8,)
    module = nets.build_model(config)
    apply_fn = nets.make_apply_fn(module)
    tx = optim.make_optimizer(config.optim)
    mesh = distributed.make_mesh(jax.devices()[:1])
    state = train_step.init_state(jax.tree.map(jnp.array, params), tx,
                                  objectives.get(config.cm.loss).keeps_target, 1)
    cm_cfg = CMConfig.from_config(config)
    step = train_step.make_train_step(apply_fn, cm_cfg, objectives.get(cm_cfg.loss), tx,
                                      (0.99,), mesh)
    new_state, metrics = step(state, distributed.shard_batch(batch, mesh),
                              {"step_key": jax.random.PRNGKey(1)})
    return apply_fn, jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def steps():
    config = tiny_config()
    config.model.ch_mult, config.model.attn_resolutions = (1,), (8,)
    config.model.init_scale = 1.0  # the default zero-initialised output would hide the net
    params = jax.device_get(nets.init_params(nets.build_model(config), jax.random.PRNGKey(0),
                                              config))
    batch = data.Batcher(data.load_digits(8), 16, seed=0, random_flip=False).batch(5)
    return params, batch, {d: one_step(d, params, batch) for d in ("float32", "bfloat16")}


def float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_bf16_keeps_state_and_loss_in_float32(steps):
    params, batch, results = steps
    apply_fn, state, metrics = results["bfloat16"]
    for part in (state.params, state.opt_state, state.ema_params):
        dtypes = {x.dtype for x in float_leaves(part)}
        assert dtypes == {np.dtype(np.float32)}, dtypes
    assert all(np.asarray(v).dtype == np.float32 for v in metrics.values()
               if np.issubdtype(np.asarray(v).dtype, np.floating))
    x = jnp.asarray(batch["x"][:2])
    t = jnp.full((2,), 0.1)
    jaxpr = str(jax.make_jaxpr(lambda p: apply_fn(p, x, t, None, False, None))(params))
    assert "bf16" in jaxpr  # the network really computes in bfloat16
    out = apply_fn(params, x, t, None, False, None)
    assert out.dtype == jnp.float32


def test_bf16_step_close_to_float32(steps):
    params, _, results = steps
    (_, s32, m32), (_, s16, m16) = results["float32"], results["bfloat16"]
    rel = abs(float(m16["loss"]) - float(m32["loss"])) / abs(float(m32["loss"]))
    assert rel < 1e-2, rel  # measured ~3e-5 (CPU, tiny config)

    def update(state):
        return np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True)])

    u32, u16 = update(s32), update(s16)
    cosine = float(u32 @ u16 / (np.linalg.norm(u32) * np.linalg.norm(u16)))
    assert cosine > 0.99, cosine  # measured ~0.9999
    assert float(m16["grad_norm"]) == pytest.approx(float(m32["grad_norm"]), rel=5e-2)
