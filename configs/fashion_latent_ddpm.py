"""DDPM on Fashion-MNIST latents, sampled with DDIM: the paper's Stable Diffusion row
(latent diffusion with immiscible pairing of the noise and the latents), CPU-sized.

The autoencoder is configs/fashion_ae.py's (`--mode train_ae` into runs/fashion_ae: 32x32
images -> 8x8x4 latents); `--mode encode` writes the latent store once, then this trains
on it (docs/latent.md). The objective, schedule, optimiser and DDIM evaluation are those
of configs/fashion_ddpm.py (T = 1000 linear betas, Adam 1e-3 with 100 warmup steps,
clipping at 1, EMA 0.995, batch 64, 2,000 steps, a snapshot every 200, DDIM-10), on the
8x8x4 latents with the DDPM U-Net at ch 32, ch_mult (1, 2), one block per level,
attention at 4x4. Samples are decoded by the autoencoder; `fd_fashion` of 2,000 decoded
samples against the 60,000 training images (the reconstruction floor is one row of its
own). The sweep's couplings: none, linear, knn with k = 64 (the authors' SD setting) and
k = 4, pairing the noise with the latents over the whole batch.
"""

from configs import base, fashion_ae, fashion_ddpm


def get_config(arg: str | None = None):
    config = fashion_ddpm.get_config()
    fashion_ae.on_latents(config)
    return base.with_arg(config, arg)
