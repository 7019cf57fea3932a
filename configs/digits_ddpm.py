"""DDPM on sklearn's 8x8 digits, sampled with DDIM: the CIFAR-10 DDPM setting, shrunk for a CPU.

The loss, schedule (T = 1000, linear betas 1e-4 to 0.02), network family (the DDPM U-Net,
`model.name=ddpm_unet`), Adam with warmup and gradient clipping at 1.0, and DDIM
evaluation are those of `configs/cifar10_ddpm.py`; only sizes change, to train on the
1,797 real 8x8 grayscale digits in minutes on two CPU cores: ch 32, ch_mult (1, 2),
one residual block per level, attention at 4x4 (701,345 parameters), no dropout (a tiny
network on little data, trained briefly), lr 1e-3 with 100 warmup steps, batch 64 (as the
digits CT sweep), 1,000 steps with a snapshot every 125, EMA 0.995, no flips (digits are
not mirror-symmetric). Samples: DDIM (eta 0) with 10 and 50 steps; the metric is
`fd_pixels` (no Inception network for 8x8 grayscale images). On two loaded CPU cores a
run trains at 3.5-6.5 steps/s; evaluating one snapshot takes ~12 s with ddim10 and
~45 s with ddim50 (1,797 samples).
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.random_flip = False
    model = config.model
    model.name = "ddpm_unet"
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    config.cm.loss = "ddpm"
    config.cm.metric = "l2"  # not read by the DDPM loss (always MSE on eps); for the record
    config.cm.num_timesteps = 1000
    config.cm.beta_schedule = "linear"
    config.optim.optimizer = "adam"
    config.optim.lr = 1e-3
    config.optim.warmup = 100
    config.optim.grad_clip = 1.0
    config.training.batch_size = 64
    config.training.n_iters = 1000
    config.training.ema_rates = (0.995,)
    config.training.log_every = 50
    config.training.sample_every = 500
    config.training.snapshot_every = 125
    config.training.keep_snapshots = 8
    config.training.resume_every = 125
    config.training.n_grid = 64
    config.sample.solver = "ddim"
    config.sample.steps = 50
    config.eval.samplers = ("ddim10", "ddim50")
    config.eval.n_samples = 1797
    config.eval.batch_size = 256
    return base.with_arg(config, arg)
