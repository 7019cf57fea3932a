"""Tests for the NCSN++ network (cm/ncsnpp.py) and its layers (cm/layers.py, cm/resample.py).

Compiling threefry-based random init is slow on CPU, so forward tests fill the shapes from
`jax.eval_shape` with numpy random values and run the model op by op (no jit, cached
primitives), and the few random draws use the cheap `unsafe_rbg` key implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from cm.nets import layers, resample
from cm.nets.ncsnpp import NCSNpp, NCSNppConfig, count_params
from configs.base import get_config

TAPS = (1, 3, 3, 1)
TINY = dict(
    image_size=8, num_channels=3, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)
)


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="unsafe_rbg")


def _tiny(**overrides) -> NCSNppConfig:
    return NCSNppConfig(**{**TINY, **overrides})


def _inputs(batch: int = 2, size: int = 8):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    t = jnp.asarray(0.25 * np.log(np.geomspace(0.002, 80.0, batch)), jnp.float32)
    return x, t


def _random_params(model: NCSNpp, x, t, labels=None, seed: int = 0):
    """Params with the model's shapes and O(1) activations, without compiling an init."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(s.shape).astype(np.float32)
        if len(s.shape) >= 2:  # kernels and embedding tables: unit-gain fan-in scaling
            return jnp.asarray(z / math.sqrt(np.prod(s.shape[:-1])))
        if "scale" in name:  # GroupNorm gains
            return jnp.asarray(1.0 + 0.1 * z)
        return jnp.asarray(0.1 * z)  # biases, Fourier frequencies

    return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------- forward pass variants


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # CIFAR-10 CT layout: biggan, fourier, input residual, no output pyramid
        dict(resblock_type="ddpm", progressive_input="none"),
        dict(embedding_type="positional", progressive="output_skip"),
        dict(resblock_type="ddpm", progressive_input="input_skip", progressive="residual"),
        dict(
            progressive_input="input_skip", progressive_combine="cat", embedding_type="positional"
        ),
        dict(resblock_type="ddpm", fir=False, resamp_with_conv=False, progressive="output_skip"),
        dict(fir=False, skip_rescale=False, progressive="residual", progressive_input="none"),
    ],
)
def test_output_shape_and_dtype(overrides):
    model = NCSNpp(_tiny(**overrides))
    x, t = _inputs()
    params = _random_params(model, x, t)
    y = model.apply({"params": params}, x, t)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.std(y)) > 1e-2  # the random-parameter network is not degenerate


def test_class_conditioning_changes_output():
    model = NCSNpp(_tiny(num_classes=10))
    x, t = _inputs()
    labels = jnp.array([0, 1], jnp.int32)
    params = _random_params(model, x, t, labels)
    assert params["Embed_0"]["embedding"].shape == (10, 64)
    y0 = model.apply({"params": params}, x, t, labels)
    y1 = model.apply({"params": params}, x, t, jnp.array([2, 1], jnp.int32))
    assert float(jnp.abs(y0[0] - y1[0]).max()) > 1e-3  # label changed
    np.testing.assert_allclose(y0[1], y1[1], rtol=1e-5, atol=1e-5)  # label kept
    with pytest.raises(ValueError, match="labels are required"):
        jax.eval_shape(model.init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(NCSNpp(_tiny()).init, jax.random.key(0), x, t, labels)


def test_bfloat16_close_to_float32():
    x, t = _inputs()
    model32 = NCSNpp(_tiny())
    model16 = NCSNpp(_tiny(dtype="bfloat16"))
    params = _random_params(model32, x, t)
    shapes16 = jax.eval_shape(model16.init, jax.random.key(0), x, t)["params"]
    assert jax.tree.structure(shapes16) == jax.tree.structure(params)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes16))  # params stay fp32
    y32 = model32.apply({"params": params}, x, t)
    y16 = jax.jit(model16.apply)({"params": params}, x, t)  # one compile beats eager bf16
    assert y16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert 0.0 < rel < 0.05, rel


def test_dropout_only_in_training():
    model = NCSNpp(_tiny(dropout=0.5))
    x, t = _inputs()
    params = {"params": _random_params(model, x, t)}
    y_eval = model.apply(params, x, t)  # no 'dropout' rng needed
    np.testing.assert_array_equal(y_eval, model.apply(params, x, t, train=False))
    y_a = model.apply(params, x, t, train=True, rngs={"dropout": _key(1)})
    y_b = model.apply(params, x, t, train=True, rngs={"dropout": _key(2)})
    assert float(jnp.abs(y_a - y_eval).max()) > 1e-3
    assert float(jnp.abs(y_a - y_b).max()) > 1e-3


def test_init_scale_zero_initialises_block_outputs():
    # The original maps init_scale 0 to variance scale 1e-10: tiny, not exactly zero.
    h = jnp.ones((1, 4, 4, 8))
    temb = jnp.ones((1, 16))
    block = layers.ResnetBlockBigGANpp(out_ch=16, init_scale=0.0, dropout=0.0)
    p = jax.jit(block.init)(_key(0), h, temb)["params"]
    assert float(jnp.abs(p["Conv_1"]["kernel"]).max()) < 1e-5  # last conv ~ 0
    assert float(jnp.abs(p["Conv_0"]["kernel"]).max()) > 1e-2  # others at full scale
    out = block.apply({"params": p}, h, temb)
    # So the block starts as its rescaled 1x1 shortcut.
    expected = (h @ p["Conv_2"]["kernel"][0, 0] + p["Conv_2"]["bias"]) / math.sqrt(2.0)
    np.testing.assert_allclose(out, expected, atol=1e-4)


# ---------------------------------------------------------------- FIR resampling


def _np_upfirdn(x, k, up, down, pad0, pad1):
    """StyleGAN2 upfirdn on [H, W] arrays: zero-stuff after each pixel, pad, convolve, decimate."""
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    z[::up, ::up] = x
    z = np.pad(z, ((pad0, pad1), (pad0, pad1)))
    windows = sliding_window_view(z, k.shape)  # [H', W', K, K]
    y = np.einsum("ijab,ab->ij", windows, k[::-1, ::-1])  # true convolution
    return y[::down, ::down]


def _np_conv_same(x, w):
    """'SAME' cross-correlation of [H, W, Cin] with [3, 3, Cin, Cout]."""
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    return np.einsum("ijcab,abcd->ijd", sliding_window_view(xp, (3, 3), axis=(0, 1)), w)


def test_fir_kernel_is_normalised_outer_product():
    k = resample.fir_kernel(TAPS)
    np.testing.assert_allclose(k, np.outer(TAPS, TAPS) / 64.0)
    np.testing.assert_allclose(resample.fir_kernel(TAPS, gain=4.0).sum(), 4.0, rtol=1e-6)


def test_downsample_is_direct_correlation_with_outer_kernel():
    img = np.random.default_rng(0).standard_normal((6, 6))
    k = np.outer(TAPS, TAPS) / 64.0
    xp = np.pad(img, 1)
    expected = np.array(
        [[np.sum(k * xp[2 * i : 2 * i + 4, 2 * j : 2 * j + 4]) for j in range(3)] for i in range(3)]
    )
    got = resample.downsample_2d(jnp.asarray(img, jnp.float32)[None, :, :, None], TAPS)
    np.testing.assert_allclose(got[0, :, :, 0], expected, atol=1e-5)


def test_upsample_matches_reference_and_is_adjoint_of_downsample():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((4, 4))
    k4 = np.outer(TAPS, TAPS) / 16.0  # gain factor^2 = 4
    got = resample.upsample_2d(jnp.asarray(img, jnp.float32)[None, :, :, None], TAPS)
    np.testing.assert_allclose(got[0, :, :, 0], _np_upfirdn(img, k4, 2, 1, 2, 1), atol=1e-5)
    # <down(a), b> == <a, up(b)> / 4: the two filters are transposes of each other.
    a = jnp.asarray(rng.standard_normal((1, 8, 8, 2)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((1, 4, 4, 2)), jnp.float32)
    lhs = jnp.sum(resample.downsample_2d(a, TAPS) * b)
    rhs = jnp.sum(a * resample.upsample_2d(b, TAPS)) / 4.0
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_constant_image_stays_constant_away_from_border():
    x = jnp.full((1, 8, 8, 2), 3.0)
    np.testing.assert_allclose(resample.upsample_2d(x, TAPS)[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
    np.testing.assert_allclose(resample.downsample_2d(x, TAPS)[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
    np.testing.assert_allclose(resample.naive_downsample_2d(x), 3.0)
    np.testing.assert_allclose(resample.naive_upsample_2d(x), 3.0)


def test_upfirdn_asymmetric_kernel_matches_reference():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((5, 5))
    k = rng.standard_normal((3, 3))
    x = jnp.asarray(img, jnp.float32)[None, :, :, None]
    for up, down, pad in [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (0, 2))]:
        got = resample.upfirdn2d(x, k, up=up, down=down, pad=pad)[0, :, :, 0]
        np.testing.assert_allclose(got, _np_upfirdn(img, k, up, down, *pad), atol=1e-5)


def test_fused_resampling_convs_equal_unfused_in_the_interior():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 8, 2)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    k = resample.fir_kernel(TAPS)
    # conv_downsample_2d(x, w) == downsample(conv(x, w)) away from the border.
    conv = _np_conv_same(x, w)
    ref = np.stack([_np_upfirdn(conv[..., c], k, 1, 2, 1, 1) for c in range(3)], -1)
    got = resample.conv_downsample_2d(jnp.asarray(x)[None], jnp.asarray(w), TAPS)[0]
    np.testing.assert_allclose(got[1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-4)
    # upsample_conv_2d(x, w) == conv(upsample(x), w) away from the border.
    up = np.stack([_np_upfirdn(x[..., c], 4 * k, 2, 1, 2, 1) for c in range(2)], -1)
    ref = _np_conv_same(up, w)
    got = resample.upsample_conv_2d(jnp.asarray(x)[None], jnp.asarray(w), TAPS)[0]
    np.testing.assert_allclose(got[1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-4)


# ---------------------------------------------------------------- config and size


def test_from_config_reads_model_section():
    cfg = NCSNppConfig.from_config(get_config().model, image_size=32, num_channels=3)
    assert cfg == NCSNppConfig()  # the dataclass defaults are the CIFAR-10 CT model
    assert cfg.fir_kernel == (1, 3, 3, 1) and isinstance(cfg.ch_mult, tuple)
    hash(cfg)
    with pytest.raises(ValueError, match="progressive"):
        NCSNppConfig(progressive="skip")


def _expected_cifar10_ct_params() -> int:
    """Counts NCSN++ parameters from the architecture alone (no Flax), CIFAR-10 CT settings."""
    nf, ch, temb, img_c = 128, 256, 512, 3
    conv = lambda k, i, o: k * k * i * o + o
    gn = lambda c: 2 * c

    def res(i, o, resample=False):  # BigGAN block
        n = gn(i) + conv(3, i, o) + temb * o + o + gn(o) + conv(3, o, o)
        return n + (conv(1, i, o) if (i != o or resample) else 0)

    attn = gn(ch) + 4 * (ch * ch + ch)  # q, k, v, out
    n = nf + (2 * nf * temb + temb) + (temb * temb + temb)  # Fourier W + 2-layer MLP
    n += conv(3, img_c, nf)
    # Encoder: 3 levels of 4 blocks, attention at 16x16 (level 1); 2 down blocks and 2
    # input-pyramid FIR convs (3 -> 256, then 256 -> 256 since the pyramid becomes h).
    n += res(nf, ch) + 3 * res(ch, ch) + 4 * res(ch, ch)
    n += 4 * res(ch, ch) + 4 * attn
    n += 2 * res(ch, ch, resample=True) + conv(3, img_c, ch) + conv(3, ch, ch)
    n += 2 * res(ch, ch) + attn  # middle
    # Decoder: 5 blocks per level on [h, skip]; the last skip is the 128-channel stem.
    n += 3 * 5 * res(2 * ch, ch) - res(2 * ch, ch) + res(ch + nf, ch)
    n += attn + 2 * res(ch, ch, resample=True)  # attention at 16x16, 2 up blocks
    n += gn(ch) + conv(3, ch, img_c)
    return n


def test_cifar10_ct_parameter_count():
    # 56,395,651 = the OpenAI JAX NCSN++ (same parameter tree, checked against that code),
    # including the 128 frozen Fourier frequencies. EDM's PyTorch re-implementation of the
    # same network stores those as a buffer: 56,395,523 trainable (~56.4M). The often quoted
    # 55.73M is EDM's DDPM++ CIFAR-10 net: positional embedding of width 128 (-65,536) and no
    # input pyramid convs (-7,168 - 590,080) gives 55,732,739.
    cfg = NCSNppConfig.from_config(get_config().model, image_size=32, num_channels=3)
    model = NCSNpp(cfg)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    assert count_params(shapes) == 56_395_651
    assert _expected_cifar10_ct_params() == 56_395_651
    assert count_params({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4)]}) == 10
