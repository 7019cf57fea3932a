"""DDPM on Fashion-MNIST at 16x16, sampled with DDIM: the CIFAR-10 DDPM setting, CPU-sized.

The loss, schedule (T = 1000, linear betas 1e-4 to 0.02), network family (the DDPM U-Net,
`model.name=ddpm_unet`), Adam with warmup and gradient clipping at 1.0, and DDIM
evaluation are those of `configs/cifar10_ddpm.py` (each value's source is there); the
data and sizes are those of the consistency benchmark `configs/fashion_ict.py`, so the
two can be read side by side: the 60,000 training images resized to 16x16, batch 64,
2,000 steps, a snapshot every 200, no flips (all footwear points left). Network: ch 16
as fashion_ict's NCSN++, ch_mult (1, 2, 2), one residual block per level, attention at
4x4, no dropout (a small network trained briefly): 280,177 parameters (fashion_ict:
322,961). lr 1e-3 with 100 warmup steps and EMA 0.995 as `configs/digits_ddpm.py`
(CIFAR-10's 2e-4, 5,000 warmup steps and 0.9999 are for 800k steps).

Evaluation: `fd_fashion` (the Fréchet distance in the Fashion-MNIST classifier's
features, `evaluation/fashion_net.py`) of 5,000 DDIM samples (eta 0, 10 steps) against the
60,000 training images. Sizes and measured times: docs/results.md, "DDPM on
Fashion-MNIST".
"""

from configs import base, digits_ddpm


def get_config(arg: str | None = None):
    config = digits_ddpm.get_config()  # loss, schedule, U-Net family, optimiser, EMA, DDIM
    config.data.name = "fashion_mnist"
    config.data.image_size = 16
    config.model.nf = 16
    config.model.ch_mult = (1, 2, 2)
    config.training.n_iters = 2000
    config.training.log_every = 100
    config.training.sample_every = 1000
    config.training.snapshot_every = 200
    config.training.keep_snapshots = 10
    config.training.resume_every = 200
    config.training.n_grid = 100
    config.sample.steps = 10
    config.eval.samplers = ("ddim10",)
    config.eval.n_samples = 5000
    config.eval.batch_size = 500
    config.eval.features = "fashion"
    return base.with_arg(config, arg)
