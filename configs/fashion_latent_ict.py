"""iCT on Fashion-MNIST latents (8x8x4, configs/fashion_ae.py's autoencoder): the project's
consistency objective in latent space, CPU-sized.

configs/fashion_ict.py's recipe (iCT, pseudo-Huber, lognormal levels, curriculum 10 ->
160, Fourier scale 0.02, Adam 1e-3 with 100 warmup steps, EMA 0.99, batch 64, 2,000
steps) with an NCSN++ of nf 32, ch_mult (1, 2), attention at 4x4, on the latents; samples
decoded by the autoencoder, `fd_fashion` of 2,000 one- and two-step samples.
"""

from configs import base, fashion_ae, fashion_ict


def get_config(arg: str | None = None):
    config = fashion_ict.get_config()
    fashion_ae.on_latents(config)
    return base.with_arg(config, arg)
