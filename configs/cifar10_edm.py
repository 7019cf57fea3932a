"""CIFAR-10 EDM diffusion training (Karras et al. 2022), with optional assignment.

The teacher of consistency distillation. Values from the OpenAI consistency-model code's
`cifar10_k_ve.py` teacher config, which follows EDM (restated in REFERENCE.md):
- preconditioning with sigma_data 0.5, lognormal sigma (P_mean -1.2, P_std 1.2), the
  EDM loss weighting (EDM Table 1); the noise passes through the same assignment stage
  as consistency training (`--config.assignment.method=linear`);
- Adam lr 1e-3 with a warmup of 1e7/512 = 19,531 steps (10M images); batch 512;
  400k iterations (200M images); dropout 0.13;
- EMA with a half-life of 0.5M images, given the EDM way
  (`training.ema_halflife_kimg = 500`): 0.5 ** (512 / 500,000) = 0.99929 per step at
  batch 512 (the rate follows the global batch); 0.9999 would be a 3.5M-image half-life;
- network: the NCSN++ of the CT config (nf 128, ch_mult (2,2,2), 4 res blocks,
  attention at 16x16, BigGAN blocks, FIR, Fourier embedding). EDM's own CIFAR-10
  network is its DDPM++ / NCSN++ variant; this is the closest match the project has.
Samples: Heun, 18 steps (35 network calls), EDM's CIFAR-10 sampler.
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
    config.training.ema_halflife_kimg = 500.0  # sets the first (only) EMA rate
    config.sample.solver = "heun"
    config.sample.steps = 18
    config.eval.samplers = ("heun18",)  # --mode eval: also e.g. euler50 (DDIM-like)
    # Pair over the whole global batch, the same permutation on every process: the paper's
    # assignment batch (its SD code all-gathers and solves one problem); device/host as options.
    config.assignment.scope = "global"
    return base.with_arg(config, arg)
