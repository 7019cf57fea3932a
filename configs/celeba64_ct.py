"""CelebA 64x64 consistency training (CT), with optional immiscible assignment.

Data: TFDS `celeb_a` train split (162,770 images of 218x178), the usual center crop
of 140x140 resized to 64x64, random horizontal flips. The immiscible paper's CelebA
consistency-model runs used batch 1024 (secondary source); the network and schedule
below are this project's choice, not a published setting: NCSN++ with one more
resolution level than CIFAR-10 (64, 32, 16, 8; ch_mult (1, 2, 2, 2)), attention at
16x16, the CIFAR-10 CT schedule (s0 = 2, s1 = 150, mu0 = 0.9), RAdam 2e-4 with warmup,
pseudo-Huber metric until LPIPS exists here.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "tfds:celeb_a"
    config.data.image_size = 64
    config.data.crop = 140
    config.data.random_flip = True
    config.model.nf = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 4
    config.model.attn_resolutions = (16,)
    config.cm.loss = "ct"
    config.cm.metric = "pseudo_huber"
    config.cm.start_scales = 2
    config.cm.end_scales = 150
    config.cm.start_ema = 0.9
    config.optim.optimizer = "radam"
    config.optim.lr = 2e-4
    config.optim.warmup = 10_000_000 // 1024
    config.training.batch_size = 1024
    config.training.n_iters = 600_000
    config.training.ema_rates = (0.9999,)
    # Pair over the whole global batch, the same permutation on every process: the paper's
    # assignment batch (its SD code all-gathers and solves one problem); device/host as options.
    config.assignment.scope = "global"
    return base.with_arg(config, arg)
