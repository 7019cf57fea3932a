"""Quick start: consistency training on sklearn's handwritten digits, on a CPU in minutes.

The digits (1,797 real 8x8 grayscale images shipped inside scikit-learn, nothing to
download) are upsampled to 16x16. A small NCSN++ trains with CT (l2 metric, a short
adaptive curriculum) to recognisable digits in a few minutes on 2 CPU cores.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.num_channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.model.nf = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.fourier_scale = 16.0
    config.cm.loss = "ct"
    config.cm.metric = "l2"
    config.cm.start_scales = 2
    config.cm.end_scales = 40
    config.cm.start_ema = 0.9
    config.optim.optimizer = "radam"
    config.optim.lr = 1e-3
    config.optim.warmup = 100
    config.training.batch_size = 64
    config.training.n_iters = 2000
    config.training.ema_rates = (0.999,)
    config.training.log_every = 100
    config.training.sample_every = 500
    config.training.snapshot_every = 1000
    config.training.resume_every = 250
    config.training.n_grid = 64
    config.sample.ts = (80.0,)
    config.eval.n_samples = 2000
    config.eval.batch_size = 250
    return base.shrink(config) if arg == "smoke" else config
