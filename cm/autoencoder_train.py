"""`--mode train_ae`: trains the KL autoencoder of latent training (diffusers' AutoencoderKL
architecture, `cm.nets.autoencoder`) on the run's images, and writes it in diffusers'
layout to `<workdir>/autoencoder/` (config.json + diffusion_pytorch_model.safetensors),
which `latent.autoencoder=<workdir>` then loads like any SD autoencoder.

Loss: the per-image sum of |x - decode(z)| with z drawn from the posterior
(reparameterised), plus `latent.kl_weight` times the per-image KL divergence to N(0, I),
both averaged over the batch: LDM's KL autoencoder (Rombach et al. 2022, their f4 / f8
configs: KL weight 1e-6) without its perceptual and adversarial terms, which need LPIPS
on RGB images and a discriminator. The scaling factor written to config.json is 1 / std of
the posterior means over (up to) 10,000 training images, the way SD's 0.18215 was set, so
the scaled latents have unit variance. Resumable: a checkpoint every
`training.resume_every` steps (`training.snapshot_every` kept) in the workdir.
"""

import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cm import config as config_lib
from cm import data, optim
from cm.latent import AE_FOLDER
from cm.nets import autoencoder as ae_lib
from cm.runtime import checkpoints, logs, workdir

SCALE_IMAGES = 10_000  # images whose latent std sets the scaling factor


@flax.struct.dataclass
class AEState:
    step: jax.Array
    params: Any
    opt_state: Any


def ae_config(cfg: config_lib.Config, scaling_factor: float = 1.0) -> ae_lib.AutoencoderConfig:
    """The architecture of `latent.ae_*` for the run's images."""
    lt, n = cfg.latent, len(cfg.latent.ae_channels)
    if 2 ** (n - 1) != lt.factor:
        raise config_lib.ConfigError(f"latent.ae_channels has {n} blocks: a downsampling "
                                     f"factor of {2 ** (n - 1)}, but latent.factor={lt.factor}")
    return ae_lib.AutoencoderConfig(
        in_channels=cfg.data.num_channels, out_channels=cfg.data.num_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(lt.ae_channels), layers_per_block=lt.ae_layers,
        latent_channels=lt.channels, norm_num_groups=lt.ae_groups,
        sample_size=cfg.data.image_size, scaling_factor=float(scaling_factor))


def ae_loss(module: ae_lib.AutoencoderKL, params, x: jax.Array, key: jax.Array,
            kl_weight: float) -> tuple[jax.Array, dict]:
    """mean_b [sum |x - x_rec|] + kl_weight * mean_b [KL(q(z|x) || N(0, I))]."""
    mean, logvar = module.apply({"params": params}, x, method=ae_lib.AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = module.apply({"params": params}, z, method=ae_lib.AutoencoderKL.decode)
    l1 = jnp.mean(jnp.sum(jnp.abs(rec - x).reshape(x.shape[0], -1), axis=1))
    kl = 0.5 * jnp.sum((mean**2 + jnp.exp(logvar) - 1.0 - logvar).reshape(x.shape[0], -1),
                       axis=1)
    kl = jnp.mean(kl)
    return l1 + kl_weight * kl, {"l1": l1, "kl": kl,
                                 "mse": jnp.mean((rec - x) ** 2)}


def params_to_diffusers(params: dict) -> dict[str, np.ndarray]:
    """Flax parameters -> a diffusers state dict (names and PyTorch layouts); the inverse of
    `ae_lib.params_from_diffusers`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        value = np.asarray(leaf, np.float32)
        if keys[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[ae_lib._torch_name(keys)] = np.ascontiguousarray(value)  # noqa: SLF001
    return out


def save_diffusers(folder: str, config: ae_lib.AutoencoderConfig, params: dict) -> None:
    """Writes `config.json` and `diffusion_pytorch_model.safetensors` (diffusers' layout)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    body = {"_class_name": "AutoencoderKL", **{
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in ((f, getattr(config, f)) for f in config.__dataclass_fields__)}}
    tmp = os.path.join(folder, f"tmp{os.getpid()}")
    save_file(params_to_diffusers(params), tmp)
    os.replace(tmp, os.path.join(folder, ae_lib.WEIGHTS_NAME))
    with open(tmp, "w") as f:
        json.dump(body, f, indent=2)
    os.replace(tmp, os.path.join(folder, ae_lib.CONFIG_NAME))
    sha = os.path.join(folder, "sha256.json")
    if os.path.exists(sha):
        os.remove(sha)  # new weights: the loader records their digest again


def train_autoencoder(config: Any, run_dir: str) -> dict:
    """Trains (or resumes) the autoencoder in `run_dir`; returns the last logged metrics."""
    cfg = config_lib.build(config)
    t, lt = cfg.training, cfg.latent
    arch = ae_config(cfg)
    module = ae_lib.AutoencoderKL(arch)
    images, _ = data.load_dataset(cfg.data)
    tx = optim.make_optimizer(cfg.optim, t.n_iters)
    s, c = cfg.data.image_size, cfg.data.num_channels
    key = jax.random.PRNGKey(t.seed)

    def init(k):
        params = module.init(k, jnp.zeros((1, s, s, c), jnp.float32))["params"]
        return AEState(jnp.zeros((), jnp.int32), params, tx.init(params))

    abstract = jax.eval_shape(init, key)
    ckpt = checkpoints.Checkpointer(run_dir, keep=t.keep_snapshots,
                                    snapshot_every=t.snapshot_every,
                                    resume_every=t.resume_every)
    start, state = ckpt.restore_newest(abstract)
    if not start:
        start, state = 0, jax.jit(init)(key)
    if jax.process_index() == 0:
        workdir.write_config(run_dir, cfg)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("autoencoder %s: %s parameters, factor %d, %d latent channels; %d images",
                 arch.block_out_channels, f"{n_params:,}", arch.downsample_factor,
                 arch.latent_channels, len(images))

    @jax.jit
    def step_fn(state: AEState, x: jax.Array):
        k = jax.random.fold_in(key, state.step)
        (loss, aux), grads = jax.value_and_grad(ae_loss, argnums=1, has_aux=True)(
            module, state.params, x, k, lt.kl_weight)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return AEState(state.step + 1, params, opt_state), {"loss": loss, **aux}

    batcher = data.Batcher(images, t.batch_size, t.seed, random_flip=cfg.data.random_flip)
    writer = logs.MetricWriter(run_dir, resume_step=start)
    meter, last = logs.Meter(start, t.n_iters, t.batch_size), {}
    try:
        for step in range(start + 1, t.n_iters + 1):
            state, metrics = step_fn(state, batcher.batch(step - 1)["x"])
            if step % t.log_every == 0 or step == t.n_iters:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(m["loss"]):
                    raise FloatingPointError(f"autoencoder loss is {m['loss']} at step {step}")
                rates, _ = meter.read(step, 0.0)
                m["images_per_sec"] = rates["images_per_sec"]
                writer.write(step, m)
                last = {"step": step, **m}
                logging.info("step %d/%d loss=%.4g l1=%.4g kl=%.4g mse=%.4g %.0f img/s", step,
                             t.n_iters, m["loss"], m["l1"], m["kl"], m["mse"],
                             m["images_per_sec"])
            if step == t.n_iters or (t.snapshot_every and step % t.snapshot_every == 0) or (
                    t.resume_every and step % t.resume_every == 0):
                ckpt.save(step, state, force=step == t.n_iters)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    scale = scaling_factor(module, state.params, images)
    folder = os.path.join(run_dir, AE_FOLDER)
    save_diffusers(folder, ae_config(cfg, scale), jax.device_get(state.params))
    logging.info("autoencoder written to %s (scaling factor %.6g); train on its latents "
                 "with --config.latent.autoencoder=%s", folder, scale, run_dir)
    return {**last, "scaling_factor": scale}


def scaling_factor(module: ae_lib.AutoencoderKL, params, images: np.ndarray) -> float:
    """1 / std of the posterior means of (up to) `SCALE_IMAGES` training images."""
    enc = jax.jit(lambda p, x: module.apply({"params": p}, x,
                                            method=ae_lib.AutoencoderKL.encode)[0])
    rng = np.random.default_rng(0)
    rows = np.sort(rng.permutation(len(images))[:SCALE_IMAGES])
    means = [np.asarray(enc(params, np.asarray(images[rows[i:i + 500]], np.float32) / 127.5
                            - 1.0)) for i in range(0, len(rows), 500)]
    return float(1.0 / np.std(np.concatenate(means)))
