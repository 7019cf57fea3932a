"""The SD autoencoder in Flax (`cm.nets.autoencoder`) against diffusers' PyTorch `AutoencoderKL`.

References come only from diffusers (0.42) with random weights: GroupNorm scales and every
bias are perturbed away from their init, so a scale read as a bias, a transposed kernel or
two swapped tensors all change the outputs. Its state dict goes through the same mapping
`load_autoencoder` uses. Closeness: max |ours - reference| <= 1e-4 * std(reference), for
the encoder's mean and logvar and the decoder's output. No network: hub downloads are
replaced by a function copying from a local folder, or by one that fails.
"""

import dataclasses
import json
import shutil
import sys

import jax
import numpy as np
import pytest

from cm.nets import autoencoder as ae
from pretrained.fetch import WeightsError, sha256_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TOL = 1e-4  # of the reference's standard deviation
FILES = (ae.CONFIG_NAME, ae.WEIGHTS_NAME)


def _blocks(widths: tuple[int, ...], **kw) -> dict:
    return dict(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), **kw)


SMALL = _blocks((32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                sample_size=32)
SD = _blocks((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
             sample_size=256)
# stabilityai/sd-vae-ft-mse's config.json as saved by diffusers 0.9 (no scaling_factor).
SD_VAE_FT_MSE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.9.0",
    "_name_or_path": "stabilityai/sd-vae-ft-mse", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@dataclasses.dataclass
class Case:
    """A random torch model's state dict, inputs, and its outputs (NHWC numpy)."""

    model: object
    state_dict: dict[str, np.ndarray]
    images: np.ndarray  # [B, H, W, 3] in [-1, 1]
    latents: np.ndarray  # [B, H/f, W/f, 4], N(0, 1)
    ref: dict[str, np.ndarray]  # mean, logvar, decoded


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: "torch.Tensor") -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


def _case(kwargs: dict, batch: int, size: int, seed: int) -> Case:
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # GroupNorm scales, 1 at init
                p.add_(0.2 * torch.randn_like(p))
    rng = np.random.default_rng(seed)
    f = 2 ** (len(kwargs["block_out_channels"]) - 1)
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    latents = rng.standard_normal((batch, size // f, size // f, 4)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(_nchw(images)).latent_dist
        decoded = model.decode(_nchw(latents)).sample
    ref = dict(mean=_nhwc(dist.mean), logvar=_nhwc(dist.logvar), decoded=_nhwc(decoded))
    state_dict = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return Case(model, state_dict, images, latents, ref)


def _run(model: ae.Autoencoder, case: Case) -> dict[str, np.ndarray]:
    mean, logvar = model.encode(case.images)
    decoded = model.decode(case.latents)
    return dict(mean=np.asarray(mean), logvar=np.asarray(logvar), decoded=np.asarray(decoded))


def _errors(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """max |ours - ref| / std(ref) per output."""
    return {k: float(np.abs(ours[k] - ref[k]).max() / ref[k].std()) for k in ref}


def _assert_parity(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    for k in ref:
        assert ours[k].shape == ref[k].shape, (k, ours[k].shape, ref[k].shape)
    errors = _errors(ours, ref)
    assert max(errors.values()) <= TOL, errors


@pytest.fixture(scope="module")
def small() -> Case:
    return _case(SMALL, batch=2, size=32, seed=0)


@pytest.fixture(scope="module")
def small_config(small) -> ae.AutoencoderConfig:
    return ae.AutoencoderConfig.from_json(dict(small.model.config))


@pytest.fixture(scope="module")
def small_ours(small, small_config) -> dict[str, np.ndarray]:
    variables = ae.params_from_diffusers(small.state_dict, small_config)
    return _run(ae.Autoencoder(small_config, variables), small)


@pytest.fixture(scope="module")
def sd_errors() -> dict[str, float]:
    """SD's own configuration on one 64x64 image; computed once, the models then freed."""
    case = _case(SD, batch=1, size=64, seed=1)
    config = ae.AutoencoderConfig.from_json(dict(case.model.config))
    assert config == dataclasses.replace(ae.SD_CONFIG, sample_size=256)
    variables = ae.params_from_diffusers(case.state_dict, config)
    ours = _run(ae.Autoencoder(config, variables), case)
    for k in case.ref:
        assert ours[k].shape == case.ref[k].shape, k
    assert (case.ref["logvar"] > -30).all() and (case.ref["logvar"] < 20).all()  # not clamped
    return _errors(ours, case.ref)


def test_sd_configuration_parity(sd_errors):
    assert max(sd_errors.values()) <= TOL, sd_errors


def test_small_configuration_parity(small, small_ours):
    _assert_parity(small_ours, small.ref)


@pytest.mark.parametrize("a, b", [
    ("encoder.mid_block.attentions_0.to_q", "encoder.mid_block.attentions_0.to_k"),
    ("encoder.mid_block.resnets_0.conv1", "encoder.mid_block.resnets_1.conv1"),
    ("decoder.up_blocks_0.resnets_0.conv1", "decoder.up_blocks_0.resnets_1.conv1"),
])
def test_swapped_weights_fail_parity(small, small_config, a, b):
    """Two same-shape tensors mapped to each other's place: the comparison must see it."""
    params = ae.params_from_diffusers(small.state_dict, small_config)["params"]

    def node(path: str) -> dict:
        out = params
        for part in path.split("."):
            out = out[part]
        return out

    na, nb = node(a), node(b)
    for leaf in ("kernel", "bias"):
        assert na[leaf].shape == nb[leaf].shape
        na[leaf], nb[leaf] = nb[leaf], na[leaf]
    ours = _run(ae.Autoencoder(small_config, {"params": params}), small)
    with pytest.raises(AssertionError):
        _assert_parity(ours, small.ref)
    assert max(_errors(ours, small.ref).values()) > 100 * TOL  # not a near miss


def test_old_attention_names_and_conv_storage(small, small_config):
    """query / key / value / proj_attn, stored as 1x1 convs, give the same parameters."""
    old = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key, value in small.state_dict.items():
        for new, name in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{name}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        old[key] = value
    assert sum(".query." in k for k in old) == 4  # weight and bias, encoder and decoder
    want = ae.params_from_diffusers(small.state_dict, small_config)
    got = ae.params_from_diffusers(old, small_config)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def _mismatch(state_dict, config) -> str:
    with pytest.raises(ae.AutoencoderWeightsError) as info:
        ae.params_from_diffusers(state_dict, config, "the tensors")
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_mapping_mismatches_name_the_first(small, small_config):
    sd = small.state_dict
    removed = "decoder.mid_block.attentions.0.to_k.weight"
    msg = _mismatch({k: v for k, v in sd.items() if k != removed}, small_config)
    assert f"missing tensor {removed!r} (64, 64)" in msg and "more" not in msg
    bad = dict(sd, **{"encoder.conv_in.weight": np.zeros((32, 3, 1, 1), np.float32)})
    msg = _mismatch(bad, small_config)
    assert "'encoder.conv_in.weight' has shape (32, 3, 1, 1)" in msg and "(32, 3, 3, 3)" in msg
    msg = _mismatch(dict(sd, **{"encoder.extra.weight": np.zeros(3, np.float32)}), small_config)
    assert "unexpected tensor 'encoder.extra.weight'" in msg
    twice = dict(sd, **{"encoder.mid_block.attentions.0.query.bias": np.zeros(64, np.float32)})
    assert "given twice" in _mismatch(twice, small_config)
    # A config that disagrees with all 7 latent-facing tensors: one error, the first named.
    msg = _mismatch(sd, dataclasses.replace(small_config, latent_channels=3))
    assert "'decoder.conv_in.weight' has shape (64, 4, 3, 3)" in msg and "(64, 3, 3, 3)" in msg
    assert "(and 6 more mismatches)" in msg  # encoder.conv_out, quant_conv, post_quant_conv


def test_config_json():
    config = ae.AutoencoderConfig.from_json(SD_VAE_FT_MSE_JSON)
    assert config == ae.SD_CONFIG and config.scaling_factor == 0.18215
    assert config.downsample_factor == 8
    shapes = ae.expected_shapes(config)
    assert len(shapes) == 248 and sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
    for change, what in [({"_class_name": "UNet2DModel"}, "_class_name"),
                         ({"unknown_key": 1}, "unknown_key"),
                         ({"shift_factor": 0.1159}, "shift_factor"),
                         ({"act_fn": "gelu"}, "act_fn"),
                         ({"norm_num_groups": 24}, "norm_num_groups"),
                         ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types")]:
        with pytest.raises(ValueError, match=what):
            ae.AutoencoderConfig.from_json({**SD_VAE_FT_MSE_JSON, **change})
    later = {**SD_VAE_FT_MSE_JSON, "scaling_factor": 0.13025, "force_upcast": True,
             "latents_mean": None, "use_quant_conv": True}
    assert ae.AutoencoderConfig.from_json(later).scaling_factor == 0.13025


@pytest.fixture(scope="module")
def folder(small, tmp_path_factory):
    """The small random model as diffusers saves it."""
    path = tmp_path_factory.mktemp("vae")
    small.model.save_pretrained(path, safe_serialization=True)
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)
    return path


def test_load_folder(folder, small, small_ours):
    model = ae.load_autoencoder(folder)
    assert model.digest == sha256_file(folder / ae.WEIGHTS_NAME)
    assert (model.scaling_factor, model.downsample_factor, model.latent_channels) == (
        0.18215, 2, 4)
    ours = _run(model, small)
    _assert_parity(ours, small.ref)
    for k in ours:
        np.testing.assert_array_equal(ours[k], small_ours[k])
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(small.images[:, :31, :31])


def _copy(folder, dest):
    dest.mkdir()
    for name in FILES:
        shutil.copy(folder / name, dest / name)
    return dest


@pytest.mark.parametrize("change", ["latent_channels", "removed", "shape"])
def test_folder_disagreeing_with_config(folder, small, tmp_path, change):
    dest = _copy(folder, tmp_path / "vae")
    first = "'decoder.conv_in.weight' has shape (64, 4, 3, 3)"
    if change == "latent_channels":
        config = json.loads((dest / ae.CONFIG_NAME).read_text())
        (dest / ae.CONFIG_NAME).write_text(json.dumps({**config, "latent_channels": 3}))
    else:
        tensors = dict(small.state_dict)
        if change == "removed":
            del tensors["encoder.down_blocks.0.resnets.0.norm2.bias"]
            first = "missing tensor 'encoder.down_blocks.0.resnets.0.norm2.bias' (32,)"
        else:
            tensors["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
            first = "'quant_conv.weight' has shape (8, 8, 3, 3); the config expects (8, 8, 1, 1)"
        safetensors_numpy.save_file(tensors, dest / ae.WEIGHTS_NAME)
    with pytest.raises(ae.AutoencoderWeightsError, match=str(dest)) as info:
        ae.load_autoencoder(dest)
    assert first in str(info.value)


def _fake_hub(folder, calls):
    def hf_hub_download(repo_id, filename, *, subfolder=None, revision=None, local_dir=None):
        calls.append((repo_id, filename, subfolder))
        target = f"{local_dir}/{filename}"
        shutil.copy(folder / filename, target)
        return target

    return hf_hub_download


@pytest.mark.parametrize("no_hub_package", [False, True])
def test_hub_id_offline_says_what_to_copy_where(tmp_path, monkeypatch, no_hub_package):
    if no_hub_package:
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    else:
        hub = pytest.importorskip("huggingface_hub")

        def offline(*args, **kwargs):
            raise OSError("no network")

        monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError) as info:
        ae.load_autoencoder("some-org/some-vae", cache_dir=str(tmp_path))
    msg = str(info.value)
    assert "not installed" in msg if no_hub_package else "no network" in msg
    for part in (*FILES, str(tmp_path / "some-org--some-vae"),
                 "https://huggingface.co/some-org/some-vae"):
        assert part in msg, (part, msg)
    with pytest.raises(WeightsError, match="neither a folder"):
        ae.load_autoencoder(str(tmp_path / "absent"), cache_dir=str(tmp_path))


def test_hub_id_copied_by_hand(folder, tmp_path, monkeypatch):
    """Doing what the offline message says works, and records the copied files' sha256."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(WeightsError) as info:
        ae.load_autoencoder("org/vae", cache_dir=str(tmp_path))
    target = tmp_path / "org--vae"
    assert f"into the folder {target}," in str(info.value)
    for name in FILES:
        shutil.copy(folder / name, target / name)
    model = ae.load_autoencoder("org/vae", cache_dir=str(tmp_path))
    record = json.loads((target / "sha256.json").read_text())
    assert model.digest == record["files"][ae.WEIGHTS_NAME] == sha256_file(target / ae.WEIGHTS_NAME)


def test_hub_id_fetched_once_recorded_and_checked(folder, small, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setattr(hub, "hf_hub_download", _fake_hub(folder, calls))
    model = ae.load_autoencoder("org/pipeline/vae", cache_dir=str(tmp_path))
    cached = tmp_path / "org--pipeline--vae"
    assert calls == [("org/pipeline", name, "vae") for name in FILES]
    record = json.loads((cached / "sha256.json").read_text())
    assert record["files"] == {name: sha256_file(folder / name) for name in FILES}
    assert model.digest == record["files"][ae.WEIGHTS_NAME]
    assert sorted(p.name for p in cached.iterdir()) == sorted([*FILES, "sha256.json"])
    ae.load_autoencoder("org/pipeline/vae", cache_dir=str(tmp_path))
    assert len(calls) == 2  # the second use reads the cache
    with open(cached / ae.CONFIG_NAME, "a") as f:
        f.write("\n")  # still valid JSON, but not the fetched file
    with pytest.raises(WeightsError, match="recorded in"):
        ae.load_autoencoder("org/pipeline/vae", cache_dir=str(tmp_path))
