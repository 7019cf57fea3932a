"""Fashion-MNIST iCT at 32x32 with a larger NCSN++, for a GPU (`experiments/fashion_gpu.sh`).

The same training as `fashion_ict.py` (iCT in the quick start's small-scale form; see
there), at 32x32: the 28x28 images padded with 2 pixels of background on each side (the
LeNet-5 convention; `cm/data/idx.py`), which the feature network crops off again. Network:
NCSN++ with nf 32 (twice the CPU config's), three levels (32, 16, 8; ch_mult (1, 2, 2)),
two residual blocks per level, attention at 8x8: 1.78 M parameters, 407 GFLOP per step
at batch 128 (XLA's count). Batch 128, 3,000 steps, snapshots every 300.

Sizing (an estimate, not yet measured on a GPU): the nine runs of the sweep are 11
PFLOP; at 10-25% of an H200's 494 TFLOP/s (TF32; this project's large CT step reached
36%, docs/gpu_h200.md) that is 90-220 s of training with all nine sharing the device.
This is this project's choice, not a published setting. Class-conditional with
`--config.model.num_classes=10`.
"""

from configs import base, fashion_ict


def get_config(arg: str | None = None):
    config = fashion_ict.get_config()
    config.data.image_size = 32
    config.model.nf = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (8,)
    config.training.batch_size = 128
    config.training.n_iters = 3000
    config.training.snapshot_every = 300
    config.training.keep_snapshots = 10
    config.training.resume_every = 300
    config.training.sample_every = 1500
    config.eval.n_samples = 5000
    config.eval.batch_size = 1000
    return base.with_arg(config, arg)
