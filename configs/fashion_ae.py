"""The KL autoencoder of latent training on Fashion-MNIST (`--mode train_ae`), CPU-sized.

SD's autoencoder architecture (diffusers' AutoencoderKL, `cm/nets/autoencoder.py`) made
small, as LDM's f4 models: 32x32 images (28x28 padded) -> 8x8x4 latents (factor 4: three
blocks of 16, 32, 32 channels, one ResNet layer each, GroupNorm 8), KL weight 1e-6 (LDM's
KL autoencoders), the per-image L1 loss without LDM's perceptual and GAN terms (LPIPS
needs RGB; cm/autoencoder_train.py). Adam 1e-3 with 100 warmup steps, clipping at 1,
batch 64, 2,000 steps, no flips (all footwear points left). Widths 32, 64, 64 took 1.2 s a
step on the 2 CPU cores (over an hour); 16, 32, 32 about a third of that.

  python main.py --config configs/fashion_ae.py --workdir runs/fashion_ae --mode train_ae

writes runs/fashion_ae/autoencoder/ (diffusers layout, with its scaling factor), which
configs/fashion_latent_{ict,ddpm}.py read (`latent.autoencoder=runs/fashion_ae`).
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "fashion_mnist"
    config.data.image_size = 32
    config.data.num_channels = 1
    config.data.random_flip = False
    config.latent.factor = 4
    config.latent.channels = 4
    config.latent.ae_channels = (16, 32, 32)
    config.latent.ae_layers = 1
    config.latent.ae_groups = 8
    config.latent.kl_weight = 1e-6
    config.optim.optimizer = "adam"
    config.optim.lr = 1e-3
    config.optim.warmup = 100
    config.optim.grad_clip = 1.0
    config.training.batch_size = 64
    config.training.n_iters = 2000
    config.training.log_every = 100
    config.training.snapshot_every = 500
    config.training.resume_every = 500
    config.eval.features = "fashion"
    return base.with_arg(config, arg)


def on_latents(config):
    """Makes a Fashion-MNIST config train on this autoencoder's 8x8x4 latents (the store of
    runs/fashion_ae), with a small network for them: shared by fashion_latent_*.py."""
    config.data.image_size = 32  # the autoencoder's images: 28x28 padded
    config.latent.autoencoder = "runs/fashion_ae"
    config.latent.factor = 4
    config.latent.channels = 4
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (4,)
    config.assignment.scope = "host"  # the whole batch, as the authors pair on one GPU
    config.eval.n_samples = 2000
    return config

