"""LPIPS (VGG16) against the `lpips` package, and its weights read without torch.

The reference is `lpips.LPIPS(net='vgg', pnet_rand=True)`: a random VGG16 backbone (no
download) with the real v0.1 heads shipped in the wheel. Its state dict goes through the
same converter the real loader uses. lpips 0.1.4 still runs on torchvision 0.29 (it calls
`vgg16(pretrained=False)`, deprecated but accepted); only the warnings are silenced.
"""

import collections
import copy
import functools
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cm import config as config_lib
from cm.nets import lpips as cm_lpips
from cm.runtime.views import CMConfig
from evaluation import weights
from tests.helpers import MINIMAL_NET, override

lpips = pytest.importorskip("lpips")

RTOL = 1e-4


@pytest.fixture(scope="module")
def torch_lpips() -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)


@pytest.fixture(scope="module")
def state_dict(torch_lpips) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_lpips.state_dict().items()}


@pytest.fixture(scope="module")
def variables(state_dict):
    return cm_lpips.params_from_torch(state_dict)


def _torchvision_names(state_dict) -> dict[str, np.ndarray]:
    """lpips' `net.sliceK.N.weight` -> torchvision's `features.N.weight` (same N)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("net."):
            _, _, n, leaf = k.split(".")
            out[f"features.{n}.{leaf}"] = v
    return out


def _avg_pool_copy(model: torch.nn.Module) -> torch.nn.Module:
    """piq's `replace_pooling=True` applied to an lpips model."""
    model = copy.deepcopy(model)
    for slice_ in (model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for name, child in slice_.named_children():
            if isinstance(child, torch.nn.MaxPool2d):
                setattr(slice_, name, torch.nn.AvgPool2d(kernel_size=2, stride=2))
    return model


def _pairs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Half unrelated pairs, half near ones (the regime of a training loss)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, a.shape).astype(np.float32)
    near = np.clip(a + 0.05 * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
    b[n // 2 :] = near[n // 2 :]
    return a, b


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _reference(model, a, b, resize=None) -> np.ndarray:
    ta, tb = _nchw(a), _nchw(b)
    if resize:  # the consistency-model code's call
        ta, tb = (F.interpolate(t, size=resize, mode="bilinear") for t in (ta, tb))
    with torch.no_grad():
        return model(ta, tb).numpy().reshape(-1)


@functools.partial(jax.jit, static_argnames=("resize", "pool", "dtype"))
def _ours(variables, a, b, resize=None, pool="max", dtype=jnp.float32):
    return cm_lpips.lpips_distance(variables, a, b, resize=resize, pool=pool, dtype=dtype)


@pytest.mark.parametrize("pool, size", [("max", 32), ("avg", 32), ("max", 64)])
def test_matches_lpips_package_at_native_size(torch_lpips, variables, pool, size):
    a, b = _pairs(4, size, seed=size)
    model = torch_lpips if pool == "max" else _avg_pool_copy(torch_lpips)
    ref = _reference(model, a, b)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(_ours(variables, a, b, pool=pool))
    assert got.shape == (4,) and np.all(ref > 0)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=0)


def test_matches_lpips_package_after_resize_to_224(torch_lpips, variables):
    a, b = _pairs(2, 32, seed=7)
    ref = _reference(torch_lpips, a, b, resize=224)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(_ours(variables, a, b, resize=224))
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=0)
    # The resize did happen: at native size the distances are others.
    assert np.abs(got - _reference(torch_lpips, a, b)).max() > 1e-2 * got.max()


@pytest.mark.parametrize("src", [32, 17, 240])
def test_resize_matches_torch_interpolate(src):
    x = np.random.default_rng(src).uniform(-1, 1, (2, src, src, 3)).astype(np.float32)
    ref = F.interpolate(_nchw(x), size=224, mode="bilinear", align_corners=False)
    got = cm_lpips.resize_bilinear(jnp.asarray(x), 224)
    assert got.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(np.asarray(got), ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_identity_symmetry_and_finite_gradients(variables):
    a, b = _pairs(2, 32, seed=3)
    # Pixels whose features are all zero (here the whole image: it maps to 0 through the
    # scaling layer, and the random backbone has zero biases), where sqrt(sum f^2) has
    # an infinite derivative: the gradient must still be finite.
    a[0] = np.asarray(cm_lpips._SHIFT, np.float32)
    d_ab = np.asarray(_ours(variables, a, b))
    d_aa = np.asarray(_ours(variables, a, a))  # 0 up to rounding (XLA's row order)
    assert np.all(np.abs(d_aa) <= 1e-12) and np.all(d_ab > 1e-3)
    np.testing.assert_allclose(np.asarray(_ours(variables, b, a)), d_ab, rtol=1e-6)

    # The weights are an argument, not constants baked into the program (which made
    # this test's compile 3x longer).
    def loss(a, b, v):
        return jnp.sum(cm_lpips.lpips_distance(v, a, b, resize=None))

    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b, variables)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    assert np.abs(ga[1]).max() > 0 and np.abs(gb).max() > 0
    # The gradient is the distance's: a small step along it lowers the distance.
    step = -1e-2 * gb / np.abs(gb).max()
    loss = jax.jit(loss)
    assert float(loss(a, b + step, variables)) < float(loss(a, b, variables))


def test_bfloat16_compute_is_close(variables):
    a, b = _pairs(2, 32, seed=5)
    f32 = np.asarray(_ours(variables, a, b))
    bf16 = np.asarray(_ours(variables, a, b, dtype=jnp.bfloat16))
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, f32, rtol=5e-2)


def test_converter_names_shapes_and_errors(state_dict, variables):
    init = jax.eval_shape(cm_lpips.init_variables, jax.random.key(0))  # no compile
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, variables)
    # torchvision's naming (features.N, the file's) gives the same variables.
    tv = _torchvision_names(state_dict)
    tv["classifier.0.weight"] = np.zeros((4, 2), np.float32)  # ignored
    heads = {k: v for k, v in state_dict.items() if k.startswith("lin") and "lins." not in k}
    jax.tree.map(
        np.testing.assert_array_equal, cm_lpips.params_from_torch({**tv, **heads}), variables
    )

    with pytest.raises(KeyError, match="missing"):
        cm_lpips.params_from_torch(tv)
    with pytest.raises(KeyError, match="unexpected"):
        cm_lpips.params_from_torch({**tv, **heads, "features.1.weight": np.zeros(1)})
    with pytest.raises(KeyError, match="unexpected"):
        cm_lpips.params_from_torch({**tv, **heads, "fc.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        cm_lpips.params_from_torch({**tv, **heads, "lin2.model.1.weight": np.zeros((1, 64, 1, 1))})
    alias = {**state_dict, "lins.0.model.1.weight": state_dict["lin0.model.1.weight"] + 1}
    with pytest.raises(KeyError, match="differs"):
        cm_lpips.params_from_torch(alias)


@pytest.fixture(scope="module")
def vgg_pth(tmp_path_factory, state_dict):
    """The random backbone saved as torchvision's file is (legacy format, features.N)."""
    path = tmp_path_factory.mktemp("vgg") / cm_lpips.VGG16_NAME
    tensors = collections.OrderedDict(
        (k, torch.from_numpy(v)) for k, v in _torchvision_names(state_dict).items()
    )
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    return path


def test_real_heads_from_installed_package(torch_lpips, variables, vgg_pth, tmp_path):
    installed = cm_lpips._installed_lin_path()
    assert installed is not None
    assert weights.sha256_file(installed) == cm_lpips.LIN_SHA256
    # Backbone from a .pth (hash check off: random weights), heads from the installed
    # package with their pinned hash checked, read by our reader: same as torch's.
    got = cm_lpips.load_lpips_variables(
        str(vgg_pth), cache_dir=str(tmp_path), download=False, vgg_sha256=None
    )
    jax.tree.map(np.testing.assert_array_equal, got, variables)
    assert (
        cm_lpips.load_lpips_variables(
            str(vgg_pth), cache_dir=str(tmp_path), download=False, vgg_sha256=None
        )
        is got
    )  # converted once


def test_corrupt_missing_and_wrong_files_say_what_to_do(vgg_pth, tmp_path):
    installed = cm_lpips._installed_lin_path()
    flipped = bytearray(installed.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    corrupt = tmp_path / "vgg.pth"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(weights.WeightsError, match="corrupt") as err:
        cm_lpips.load_lpips_variables(str(vgg_pth), str(corrupt), vgg_sha256=None)
    assert cm_lpips.LIN_URL in str(err.value) and "lpips_lin_path" in str(err.value)

    with pytest.raises(weights.WeightsError, match="not found") as err:
        cm_lpips.load_lpips_variables(str(tmp_path / "nope.pth"), str(installed))
    assert cm_lpips.VGG16_URL in str(err.value) and "lpips_vgg_path" in str(err.value)
    with pytest.raises(weights.WeightsError, match="not found") as err:
        cm_lpips.load_lpips_variables("", str(installed), str(tmp_path), download=False)
    assert str(tmp_path / cm_lpips.VGG16_NAME) in str(err.value)

    # The random backbone is not torchvision's file: the pinned hash rejects it.
    with pytest.raises(weights.WeightsError, match="397923af") as err:
        cm_lpips.load_lpips_variables(str(vgg_pth), str(installed))
    # Heads and backbone swapped: readable, but not the right tensors.
    with pytest.raises(weights.WeightsError, match="not VGG16"):
        cm_lpips.load_lpips_variables(str(installed), str(installed), vgg_sha256=None)


def test_heads_download_once_with_hash_check(monkeypatch, tmp_path):
    installed = cm_lpips._installed_lin_path()
    monkeypatch.setattr(cm_lpips, "_installed_lin_path", lambda: None)
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"not the heads")
    monkeypatch.setattr(cm_lpips, "LIN_URL", wrong.as_uri())
    cache = tmp_path / "cache"
    with pytest.raises(weights.WeightsError, match="does not start"):
        cm_lpips._resolve("lin", "", str(cache), True, cm_lpips.LIN_SHA256)
    assert not (cache / cm_lpips.LIN_NAME).exists()

    source = tmp_path / "upstream.pth"
    shutil.copy(installed, source)
    monkeypatch.setattr(cm_lpips, "LIN_URL", source.as_uri())
    got = cm_lpips._resolve("lin", "", str(cache), True, cm_lpips.LIN_SHA256)
    assert got == cache / cm_lpips.LIN_NAME
    assert weights.sha256_file(got) == cm_lpips.LIN_SHA256


# ---------------------------------------------------------------------------------------
# LPIPS as the consistency-training metric (cm.metric=lpips).


def test_distance_metric_lpips_is_lpips_distance_with_the_config_settings():
    from cm.objectives import consistency

    variables = cm_lpips.init_variables(jax.random.PRNGKey(0))
    a, b = jax.random.uniform(jax.random.PRNGKey(1), (2, 2, 20, 20, 3), minval=-1, maxval=1)
    for pool, resize in (("max", 0), ("avg", 32)):
        cfg = CMConfig(metric="lpips", lpips_pool=pool, lpips_resize=resize)
        got = consistency.distance(a, b, "lpips", -1.0, variables, cfg)
        want = cm_lpips.lpips_distance(variables, a, b, resize=resize or None, pool=pool)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="LPIPS weights"):
        consistency.distance(a, b, "lpips", -1.0)
    with pytest.raises(ValueError, match="lpips_pool"):
        CMConfig(metric="lpips", lpips_pool="min")
    with pytest.raises(ValueError, match="at least 16"):  # VGG16 would pool 8x8 to nothing
        CMConfig(metric="lpips", lpips_resize=8)


def _rgb_config(tmp_path, size=16):
    """configs/cifar10_ct.py:smoke (LPIPS at the native size) on random RGB images."""
    from configs import cifar10_ct

    path = tmp_path / "rgb.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8))
    config = cifar10_ct.get_config("smoke")
    assert config.cm.metric == "lpips" and config.cm.lpips_resize == 0
    config.data.name, config.data.path, config.data.image_size = "npz", str(path), size
    override(config, **MINIMAL_NET)  # the smallest NCSN++: LPIPS is what is tested
    config.training.n_iters, config.training.snapshot_every = 2, 2
    config.training.sample_every, config.training.resume_every = 0, 0
    return config


def test_ct_trains_with_lpips_from_the_configured_weight_paths(tmp_path, monkeypatch):
    from cm import train

    asked = []

    def fake_load(vgg_path, lin_path, cache_dir):  # the released weights can't be fetched here
        asked.append((vgg_path, lin_path, cache_dir))
        variables = cm_lpips.init_variables(jax.random.PRNGKey(3))
        return jax.tree.map(jnp.abs, variables)  # heads >= 0, as the released ones

    monkeypatch.setattr(cm_lpips, "load_lpips_variables", fake_load)
    config = _rgb_config(tmp_path)
    config.cm.metric = "pseudo_huber"
    huber = train.train(config, str(tmp_path / "huber"))
    assert asked == []  # not loaded unless the metric is LPIPS
    config.cm.metric = "lpips"
    config.cm.lpips_vgg_path, config.cm.lpips_lin_path = "/w/vgg16.pth", "/w/vgg.pth"
    last = train.train(config, str(tmp_path / "lpips"))
    assert asked == [("/w/vgg16.pth", "/w/vgg.pth", config.eval.cache_dir)]
    assert last["step"] == 2 and np.isfinite(last["loss"]) and last["loss"] > 0
    assert last["loss"] != pytest.approx(huber["loss"], rel=1e-3)


def test_lpips_metric_rejects_grey_or_tiny_images(tmp_path):
    from tests.helpers import tiny_config

    config = tiny_config(**{"cm.metric": "lpips", "cm.loss": "ct"})  # 8x8 grey digits
    with pytest.raises(ValueError, match="RGB"):
        config_lib.for_training(config)
    config = _rgb_config(tmp_path, size=8)
    config.cm.metric = "lpips"
    with pytest.raises(ValueError, match="at least 16x16"):
        config_lib.for_training(config)
    config.cm.lpips_resize = 224
    config_lib.for_training(config)
