"""The parameter updates of one training step against NumPy: the CT target EMA with a
decay mu(k) that is neither 0 nor 1, the evaluation EMAs, and gradient clipping where it
acts. Reference values are computed here in float64 from REFERENCE.md's formulas (CT
N(k), mu(k); EMA; global-norm clipping then Adam), never from the project's code.

The end-to-end tests see the target EMA only for CIFAR-10 CD (mu = 0, target = online)
and never with a gradient large enough to clip, so an off-by-one step in mu(k), swapped
EMA weights, or a clip that is never applied would pass them.
"""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cm import objectives, optim, train_step
from cm.runtime.views import CMConfig


def ct_n(k, K, s0, s1):
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_mu(k, K, s0, s1, mu0):
    return math.exp(s0 * math.log(mu0) / ct_n(k, K, s0, s1))


def _tree(rng, scale=1.0):
    return {"w": (scale * rng.normal(size=(3, 4))).astype(np.float32),
            "b": (scale * rng.normal(size=(4,))).astype(np.float32)}


@pytest.mark.parametrize("loss", ["ct", "cd", "ict"])
def test_target_and_evaluation_emas_after_one_update(loss):
    K, s0, s1, mu0 = 10, 2, 150, 0.9
    step = 3  # N(3) = 83, N(4) = 96: an off-by-one step in mu(k) is visible
    assert ct_n(step, K, s0, s1) != ct_n(step + 1, K, s0, s1)
    cfg = CMConfig(loss=loss, total_steps=K, start_scales=s0, end_scales=s1,
                               start_ema=mu0)
    rng = np.random.default_rng(0)
    params, target, grads = _tree(rng), _tree(rng), _tree(rng)
    emas = (_tree(rng), _tree(rng))
    rates = (0.9, 0.5)
    lr = 0.1
    tx = optax.sgd(lr)  # new params = params - lr * grads, so the update is transparent
    to_j = lambda t: {k: jnp.asarray(v) for k, v in t.items()}  # noqa: E731
    state = train_step.TrainState(
        step=jnp.int32(step), params=to_j(params),
        target_params=to_j(target) if loss != "ict" else None,
        ema_params=tuple(to_j(e) for e in emas), opt_state=tx.init(to_j(params)))
    new, mu = train_step.apply_updates(state, to_j(grads), tx, cfg, objectives.get(cfg.loss), rates)

    want_mu = {"ct": ct_mu(step, K, s0, s1, mu0), "cd": mu0, "ict": 0.0}[loss]
    assert 0.0 < want_mu < 1.0 or loss == "ict"
    assert float(mu) == pytest.approx(want_mu, rel=1e-6)
    assert int(new.step) == step + 1
    f64 = lambda t: {k: np.asarray(v, np.float64) for k, v in t.items()}  # noqa: E731
    p, t, g = f64(params), f64(target), f64(grads)
    new_p = {k: p[k] - lr * g[k] for k in p}
    for k in p:
        np.testing.assert_allclose(np.asarray(new.params[k]), new_p[k], rtol=1e-6, atol=1e-7)
    if loss == "ict":
        assert new.target_params is None
    else:  # the EMA of the updated parameters, weight mu on the old target
        for k in p:
            want = want_mu * t[k] + (1 - want_mu) * new_p[k]
            np.testing.assert_allclose(np.asarray(new.target_params[k]), want, rtol=1e-6,
                                       atol=1e-7, err_msg=f"target EMA, leaf {k}")
    for ema, old, r in zip(new.ema_params, emas, rates, strict=True):
        e = f64(old)
        for k in p:
            np.testing.assert_allclose(np.asarray(ema[k]), r * e[k] + (1 - r) * new_p[k],
                                       rtol=1e-6, atol=1e-7, err_msg=f"EMA rate {r}, leaf {k}")


def _optim(**kw):
    base = {"optimizer": "adam", "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "weight_decay": 0.0, "warmup": 0, "decay": "none", "final_lr": 0.0,
            "grad_clip": 0.0}
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _adam_reference(grads, lr, b1, b2, eps, clip):
    """Updates of global-norm clipping (when clip > 0) followed by Adam, float64."""
    m = v = 0.0
    out = []
    for i, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        norm = math.sqrt(float(np.sum(g * g)))
        if clip > 0 and norm > clip:
            g = g * (clip / norm)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**i), v / (1 - b2**i)
        out.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
    return out


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_grad_clip_acts_before_adam(clip):
    """Gradients of global norm 50, 0.3 and 4: with clip 1 the first and last are scaled
    down before Adam's moments see them, which changes the second and third updates
    (Adam's first update is the same either way, about -lr * sign(g))."""
    rng = np.random.default_rng(1)
    directions = [rng.normal(size=(6,)) for _ in range(3)]
    grads = [(n * d / np.linalg.norm(d)).astype(np.float32)
             for n, d in zip((50.0, 0.3, 4.0), directions, strict=True)]
    tx = optim.make_optimizer(_optim(grad_clip=clip))
    params = jnp.zeros((6,), jnp.float32)
    opt_state = tx.init(params)
    got = []
    for g in grads:
        upd, opt_state = tx.update(jnp.asarray(g), opt_state, params)
        got.append(np.asarray(upd, np.float64))
    want = _adam_reference(grads, 0.1, 0.9, 0.999, 1e-8, clip)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"update {i}")
    # The clip matters for this sequence: the unclipped reference is far from the clipped.
    other = _adam_reference(grads, 0.1, 0.9, 0.999, 1e-8, 1.0 - clip)
    assert np.max(np.abs(other[1] - want[1])) > 1e-2
