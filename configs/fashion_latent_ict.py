"""iCT on Fashion-MNIST latents (8x8x4, configs/fashion_ae.py's autoencoder): the project's
consistency objective in latent space, CPU-sized.

configs/fashion_ict.py's recipe (iCT, pseudo-Huber, lognormal levels, curriculum 10 ->
160, Fourier scale 0.02, Adam 1e-3 with 100 warmup steps, EMA 0.99, batch 64, 2,000
steps) with an NCSN++ of nf 32, ch_mult (1, 2), attention at 4x4, on the latents; samples
decoded by the autoencoder, `fd_fashion` of 2,000 one- and two-step samples.
"""

from configs import base, fashion_ict


def get_config(arg: str | None = None):
    config = fashion_ict.get_config()
    config.data.image_size = 32
    config.latent.autoencoder = "runs/fashion_ae"
    config.latent.factor = 4
    config.latent.channels = 4
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (4,)
    config.assignment.scope = "host"
    config.eval.n_samples = 2000
    return base.with_arg(config, arg)
