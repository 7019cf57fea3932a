"""CIFAR-10 flow matching with torchcfm's recipe (Tong et al. 2024, OT-CFM).

Each value from torchcfm's `examples/images/cifar10/train_cifar10.py` (REFERENCE.md):
- the objective: conditional flow matching with straight paths and sigma 0 (I-CFM /
  rectified flow; OT-CFM is the same loss with OT-paired noise: here
  `--config.assignment.method=linear --config.assignment.cost=sqeuclidean`), t uniform;
  torchcfm feeds t in [0, 1] to its time embedding as is (`cm.fm_t_scale = 1`);
- U-Net: 128 channels, channel_mult (1, 2, 2, 2), 2 residual blocks per level, attention
  at 16x16, dropout 0.1: the project's DDPM U-Net (`model.name=ddpm_unet`) has the same
  widths, blocks, attention resolution, dropout and parameter count (35,746,307). It
  differs in the attention's heads (one head over all channels; torchcfm's guided-diffusion
  U-Net splits them into heads of 64 channels: the same parameters, another function);
- Adam lr 2e-4, linear warmup of 5,000 steps then constant, gradient clipping at 1.0,
  batch 128, 400,000 steps, EMA 0.9999, random flips;
- samplers: the adaptive Dormand-Prince solver at rtol = atol = 1e-5 (torchcfm's FID,
  `dopri5`; FID 3.5 at batch 128, 400k steps) and Euler with 50 steps.
`configs/cifar10_fm20k.py` is the authors' comparison setting (batch 256, 20k steps).
"""

from configs import base, cifar10_ddpm


def get_config(arg: str | None = None):
    config = cifar10_ddpm.get_config()  # the U-Net, Adam 2e-4, warmup, clip, EMA, flips
    config.cm.loss = "fm"
    config.cm.fm_t_scale = 1.0  # torchcfm: t itself into the time embedding
    config.training.batch_size = 128
    config.training.n_iters = 400_000
    config.sample.solver = "euler"
    config.sample.steps = 50
    config.sample.skip = "uniform"
    config.eval.samplers = ("dopri5", "euler50")
    config.eval.skip = "uniform"
    config.assignment.scope = "global"  # the pairing's batch is the paper's global batch
    return base.with_arg(config, arg)
