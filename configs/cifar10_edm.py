"""CIFAR-10 EDM diffusion training (Karras et al. 2022), with optional assignment.

Preconditioning with sigma_data 0.5, lognormal sigma (P_mean -1.2, P_std 1.2), the EDM
loss weighting; the noise passes through the same assignment stage as consistency
training (`--config.assignment.method=linear`). Network: the NCSN++ of the CT config
(nf 128, ch_mult (2,2,2), 4 res blocks, attention at 16x16, BigGAN blocks, FIR, Fourier
embedding) with dropout 0.13 as in EDM's CIFAR-10 setting; Adam lr 1e-3 with a 10M-image
warmup, batch 512, 400k steps (200M images), EMA 0.9999. Samples: Heun, 18 steps
(35 network calls). These are this project's reading of the EDM paper and the OpenAI
teacher, not a verified copy of either config.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "cifar10"
    config.model.dropout = 0.13
    config.cm.loss = "edm"
    config.cm.p_mean = -1.2
    config.cm.p_std = 1.2
    config.optim.optimizer = "adam"
    config.optim.lr = 1e-3
    config.optim.warmup = 10_000_000 // 512
    config.training.batch_size = 512
    config.training.n_iters = 400_000
    config.training.ema_rates = (0.9999,)
    config.sample.solver = "heun"
    config.sample.steps = 18
    config.eval.samplers = ("heun18",)  # --mode eval: also e.g. euler50 (DDIM-like)
    return base.with_arg(config, arg)
