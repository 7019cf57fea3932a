"""Fashion-MNIST iCT at 32x32 with a larger NCSN++, for a GPU (`experiments/fashion_gpu.sh`).

The same training as `fashion_ict.py` (iCT in the quick start's small-scale form; see
there), at 32x32: the 28x28 images padded with 2 pixels of background on each side (the
LeNet-5 convention; `cm/idx.py`), so the feature network sees them unchanged after
cropping. Network: NCSN++ with nf 64, three levels (32, 16, 8; ch_mult (1, 2, 2)), two
residual blocks per level and attention at 8x8; batch 128, 4,000 steps. This is this
project's choice, sized so that nine runs share one GPU within a few minutes; it is not a
published setting. Class-conditional with `--config.model.num_classes=10`.
"""

from configs import base, fashion_ict


def get_config(arg: str | None = None):
    config = fashion_ict.get_config()
    config.data.image_size = 32
    config.model.nf = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (8,)
    config.training.batch_size = 128
    config.training.n_iters = 4000
    config.training.snapshot_every = 400
    config.training.keep_snapshots = 10
    config.training.resume_every = 400
    config.training.sample_every = 2000
    config.eval.n_samples = 5000
    config.eval.batch_size = 1000
    return base.with_arg(config, arg)
