"""Latent training end to end on the digits: train a tiny autoencoder (`--mode train_ae`),
reload it from its diffusers-layout folder, encode the dataset into a store (resumable,
refused when it does not match), train on the latents with pairing on them, and evaluate
in pixels with the autoencoder's reconstruction floor."""

import json
import os

import jax
import numpy as np
import pytest

from cm import autoencoder_train, latent, train
from cm import config as config_lib
from cm.data import Batcher, DatasetError, latents
from cm.nets import load_autoencoder
from tests.helpers import tiny_config

AE = {"latent.ae_channels": (8, 16), "latent.ae_groups": 4, "latent.factor": 2,
      "latent.channels": 3, "training.n_iters": 4, "training.batch_size": 16,
      "training.snapshot_every": 4, "training.log_every": 2, "optim.lr": 1e-3}


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ae"))
    last = autoencoder_train.train_autoencoder(tiny_config(**AE), run_dir)
    return run_dir, last


def test_the_autoencoder_trains_and_reloads_from_its_diffusers_folder(trained_ae):
    run_dir, last = trained_ae
    assert last["step"] == 4 and np.isfinite(last["loss"]) and last["scaling_factor"] > 0
    folder = os.path.join(run_dir, "autoencoder")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["block_out_channels"] == [8, 16] and cfg["latent_channels"] == 3
    ae = load_autoencoder(folder)
    assert (ae.downsample_factor, ae.latent_channels) == (2, 3)
    assert ae.scaling_factor == pytest.approx(last["scaling_factor"])
    # The reloaded weights compute what the trained module computes.
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    arch = autoencoder_train.ae_config(config_lib.build(tiny_config(**AE)))
    from cm.nets.autoencoder import AutoencoderKL
    from cm.runtime import checkpoints

    ckpt = checkpoints.Checkpointer(run_dir)
    assert ckpt.latest_step() == 4
    ckpt.close()
    mean, _ = ae.encode(x)
    again = AutoencoderKL(arch).apply(ae.variables, x, method=AutoencoderKL.encode)[0]
    np.testing.assert_allclose(np.asarray(mean), np.asarray(again), rtol=1e-5, atol=1e-5)
    assert latent.autoencoder_source(run_dir) == folder


def _latent_config(ae_dir, store, **extra):
    return tiny_config(**{"latent.autoencoder": ae_dir, "latent.factor": 2,
                          "latent.channels": 3, "latent.store": store,
                          "latent.encode_batch": 64, "assignment.method": "knn",
                          "assignment.k": 8, "training.n_iters": 2,
                          "training.snapshot_every": 2, "training.sample_every": 2, **extra})


def test_encode_train_and_evaluate_on_latents(trained_ae, tmp_path):
    ae_dir, _ = trained_ae
    store = str(tmp_path / "store")
    config = _latent_config(ae_dir, store)
    cfg = config_lib.build(config)
    assert cfg.net_shape == (4, 4, 3)
    with pytest.raises(DatasetError, match="--mode encode"):
        train.train(config, str(tmp_path / "early"))
    latent.encode(config, str(tmp_path / "run"))
    manifest = latents.read_manifest(store)
    assert manifest["complete"] and manifest["count"] == 1797 and not manifest["flips"]
    # Killed half way: the missing chunk is encoded again, to the same values.
    chunk = os.path.join(store, "chunks", "latents_00002.npy")
    before = np.load(chunk)
    os.remove(chunk)
    latent.encode(config, str(tmp_path / "run"))
    np.testing.assert_array_equal(np.load(chunk), before)
    # The store is the scaled posterior mean of the images.
    ae = load_autoencoder(os.path.join(ae_dir, "autoencoder"))
    from cm import data

    images, labels = data.load_dataset(cfg.data)
    stored = latents.open_store(store, ae.digest, cfg.data)
    mean, _ = ae.encode(images[:4].astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(stored.latents[:4], ae.scaling_factor * np.asarray(mean),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored.labels, labels)
    # Another autoencoder's digest, or other data, is refused.
    with pytest.raises(latents.StoreMismatchError, match="another autoencoder"):
        latents.open_store(store, "0" * 64, cfg.data)
    with pytest.raises(latents.StoreMismatchError, match="data.split"):
        latents.open_store(store, ae.digest, cfg.data.replace(split="test"))

    run_dir = str(tmp_path / "run")
    last = train.train(config, run_dir)
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert last["distance_after"] < last["distance_before"]  # knn paired noise with latents
    from PIL import Image

    grid = Image.open(os.path.join(run_dir, "samples", "step_00000002.png"))
    assert grid.size[0] > 8 * 8  # decoded 8x8 images (upscaled), not 4x4 latents
    from evaluation import run as eval_run

    ev = _latent_config(ae_dir, store, **{"eval.samplers": ("1step",), "eval.n_samples": 32,
                                          "eval.batch_size": 16,
                                          "eval.stats_path": str(tmp_path / "ref.npz")})
    rows = eval_run.evaluate(ev, run_dir)
    results = eval_run.read_results(run_dir)
    recon = [r for r in results if r["sampler"] == "reconstruction"]
    assert len(recon) == 1 and np.isfinite(recon[0]["fd_pixels"])
    assert rows[0]["sampler"] == "1step" and rows[0]["fd_pixels"] > recon[0]["fd_pixels"]
    eval_run.evaluate(ev, run_dir)
    assert len([r for r in eval_run.read_results(run_dir)
                if r["sampler"] == "reconstruction"]) == 1  # once per store


def test_flipped_rows_train_on_the_encodings_of_the_mirrored_images(trained_ae, tmp_path):
    ae_dir, _ = trained_ae
    store = str(tmp_path / "store")
    config = _latent_config(ae_dir, store, **{"data.random_flip": True})
    latent.encode(config, str(tmp_path / "run"))
    cfg = config_lib.build(config)
    ae = load_autoencoder(os.path.join(ae_dir, "autoencoder"))
    stored = latents.open_store(store, ae.digest, cfg.data)
    from cm import data

    images, _ = data.load_dataset(cfg.data)
    mirrored, _ = ae.encode(images[:3, :, ::-1].astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(stored.flipped[:3], ae.scaling_factor * np.asarray(mirrored),
                               rtol=1e-5, atol=1e-6)
    batcher = Batcher(stored.latents, 16, 0, random_flip=True, flipped=stored.flipped)
    flips, idx = batcher.flips(0), batcher.indices(0)
    x = batcher.batch(0)["x"]
    assert flips.any() and (~flips).any()
    np.testing.assert_array_equal(x[flips], stored.flipped[idx[flips]])
    np.testing.assert_array_equal(x[~flips], stored.latents[idx[~flips]])
    jax.effects_barrier()


# ----------------------------------------------------------------------------------------
# Latents are not clipped while sampling. Scaled latents have unit variance, so a clip to
# the pixels' [-1, 1] (of x0 estimates or of the end point) would cut about a third of
# their values. Data N(0, s^2) with s = 2 have an exact denoiser in closed form; sampling
# with it must end with variance s^2, and a clip anywhere gives less than 1.

S_LATENT = 2.0


def _exact_eps(cfg):
    from cm.objectives import ddpm

    ab = np.asarray(ddpm.schedule_of(cfg).alphas_cumprod, np.float64)

    def apply(params, x, t, labels, train_, key):  # E[eps | x_t] for x0 ~ N(0, s^2)
        a = jax.numpy.asarray(ab, np.float32)[t.astype(np.int32)][:, None, None, None]
        return jax.numpy.sqrt(1 - a) * x / (a * S_LATENT**2 + 1 - a)

    return apply


def test_latent_configs_sample_without_clipping_the_x0_estimates(tmp_path):
    cfg = config_lib.build(_latent_config(str(tmp_path / "ae"), str(tmp_path / "store")))
    assert cfg.sample.clip_denoised is False
    assert any("sample.clip_denoised=False" in n for n in cfg.notes)
    assert config_lib.build(tiny_config()).sample.clip_denoised is True  # pixels: unchanged


def test_ddim_honours_clip_denoised_and_records_it_when_off():
    from cm.objectives import SampleOptions, ddpm
    from cm.runtime.views import CMConfig

    cfg = CMConfig(loss="ddpm")
    apply, shape = _exact_eps(cfg), (512, 4, 4, 1)
    for name in ("ddim50", "ddpm100"):
        free = ddpm.SAMPLING.named(cfg, name, SampleOptions(clip_denoised=False))
        x = np.asarray(free.sample(apply, None, cfg, jax.random.PRNGKey(0), shape, None))
        assert np.var(x) == pytest.approx(S_LATENT**2, rel=0.1), name
        assert free.clip_denoised is False
        clipped = ddpm.SAMPLING.named(cfg, name, SampleOptions())
        y = np.asarray(clipped.sample(apply, None, cfg, jax.random.PRNGKey(0), shape, None))
        assert np.abs(y).max() <= 1.0 and clipped.clip_denoised is None  # pixel rows as before


def test_make_sampler_hands_the_decoder_unclipped_latents():
    """Every family's end point reaches the decoder as it is; pixel samples are clipped."""
    from cm.objectives import SampleOptions, edm, fm
    from cm.runtime.distributed import make_mesh
    from cm.runtime.views import CMConfig
    from cm.sampling import make_sampler

    def fm_net(params, x, t_cond, labels, train_, key):  # exact velocity, data N(0, s^2)
        t = (t_cond / 1000.0)[:, None, None, None]
        return (t - (1 - t) * S_LATENT**2) / ((1 - t) ** 2 * S_LATENT**2 + t**2) * x

    def edm_net(params, x_in, t_cond, labels, train_, key):  # exact denoiser as F
        sigma = jax.numpy.exp(4.0 * t_cond)[:, None, None, None]
        c_skip, c_out, c_in, _ = edm.scalings(sigma, 0.5)
        x = x_in / c_in
        return (S_LATENT**2 / (S_LATENT**2 + sigma**2) * x - c_skip * x) / c_out

    decode = (lambda variables, z: jax.numpy.clip(z / 8.0, -1.0, 1.0), None)  # noqa: E731
    mesh, shape = make_mesh(), (4, 4, 1)
    cases = [(fm, CMConfig(loss="fm", fm_t_scale=1000.0), fm_net, "euler50"),
             (edm, CMConfig(loss="edm", sigma_max=80.0), edm_net, "heun18")]
    for family, cfg, net, name in cases:
        spec = family.SAMPLING.named(cfg, name, SampleOptions(clip_denoised=False))
        latent_images = make_sampler(net, cfg, mesh, shape, spec, decoder=decode)
        pixels = make_sampler(net, cfg, mesh, shape, spec)
        z = (np.asarray(latent_images(None, jax.random.PRNGKey(1), 512), np.float64)
             / 127.5 - 1.0) * 8.0
        assert np.std(z) == pytest.approx(S_LATENT, rel=0.1), name
        p = np.asarray(pixels(None, jax.random.PRNGKey(1), 512))
        assert p.dtype == np.uint8 and (p == 0).mean() > 0.1 and (p == 255).mean() > 0.1
