"""CIFAR-10 consistency training (CT), the setting of Song et al. 2023 / the OpenAI JAX code.

NCSN++ (nf 128, ch_mult (2,2,2), 4 res blocks, attention at 16x16, BigGAN blocks, FIR,
skip rescale, Fourier scale 16, dropout 0), s0 = 2, s1 = 150, mu0 = 0.9, batch 512,
800k steps, RAdam lr 4e-4 with 1e7/512 warmup steps, no clipping, eval EMA 0.9999.
Metric: LPIPS-VGG16 as in the paper (cm/lpips.py: images resized to 224 bilinearly, the
lpips package's max pooling; `--config.cm.lpips_pool=avg` is piq's variant, which the
OpenAI PyTorch code uses). Weights: torchvision's VGG16 and the LPIPS v0.1 heads, from
`cm.lpips_vgg_path` / `cm.lpips_lin_path` or downloaded once into `eval.cache_dir`.
`--config.cm.metric=pseudo_huber` is the iCT paper's LPIPS-free replacement.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "cifar10"
    config.cm.loss = "ct"
    config.cm.metric = "lpips"
    config.cm.start_scales = 2
    config.cm.end_scales = 150
    config.cm.start_ema = 0.9
    config.optim.optimizer = "radam"
    config.optim.lr = 4e-4
    config.optim.warmup = 10_000_000 // 512  # 19531 steps
    config.training.batch_size = 512
    config.training.n_iters = 800_000
    config.training.ema_rates = (0.9999,)
    config.sample.ts = (80.0,)
    return base.with_arg(config, arg)
