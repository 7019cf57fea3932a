"""CIFAR-10 consistency training (CT) as published (Song et al. 2023, arXiv 2303.01469).

Values from the paper's hyperparameter table (restated in shared REFERENCE.md), CIFAR-10
CT column:
- curriculum s0 = 2, s1 = 150, target EMA mu0 = 0.9 (`cm.start_scales`, `end_scales`,
  `start_ema`); batch 512; 800k iterations; eval EMA 0.9999;
- RAdam, learning rate 4e-4, no warmup, no gradient clipping;
- metric LPIPS (VGG16): images resized to 224 bilinearly, the lpips package's max
  pooling (`--config.cm.lpips_pool=avg` is piq's variant, which the OpenAI PyTorch code
  uses); weights from `cm.lpips_vgg_path` / `cm.lpips_lin_path` or downloaded once into
  `eval.cache_dir`. `--config.cm.metric=pseudo_huber` is iCT's LPIPS-free replacement;
- network NCSN++ (base.py: nf 128, ch_mult (2,2,2), 4 res blocks, attention at 16x16,
  BigGAN blocks, FIR [1,3,3,1], skip rescale, Fourier scale 16, dropout 0), random
  horizontal flips.
Where the OpenAI JAX code (consistency_models_cifar10) differs, the paper is followed:
its CT config uses lr 2e-4 and sets a warmup of 1e7/512 steps that its RAdam path
ignores (so it trains without warmup too).
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
    config.optim.warmup = 0
    config.optim.grad_clip = 0.0
    config.training.batch_size = 512
    config.training.n_iters = 800_000
    config.training.ema_rates = (0.9999,)
    config.sample.ts = (80.0,)
    # Pair over the whole global batch, the same permutation on every process: the paper's
    # assignment batch (its SD code all-gathers and solves one problem); device/host as options.
    config.assignment.scope = "global"
    return base.with_arg(config, arg)
