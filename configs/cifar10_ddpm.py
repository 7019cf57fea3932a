"""CIFAR-10 DDPM (Ho et al. 2020) sampled with DDIM: the immiscible-diffusion DDIM experiment.

The Immiscible Diffusion paper (Li et al. 2024) trains a DDPM (epsilon prediction) with and
without assignment on the ddpm-torch code base and plots DDIM FID against training steps;
`--config.assignment.method=linear` is the immiscible arm. Sources of each value:

- Loss and schedule: epsilon prediction, simple (unweighted) MSE on eps, t uniform,
  T = 1000, linear betas 1e-4 to 0.02 (Ho et al., Sec. 4 and eq. 14; ddpm-torch
  `configs/cifar10.json`). `--config.cm.beta_schedule=cosine` is Nichol & Dhariwal
  (2021), eq. 17, as an option.
- Network: the DDPM CIFAR-10 U-Net (Ho et al., Appendix B; official code `run_cifar.py`
  and ddpm-torch `cifar10.json`): ch 128, ch_mult (1,2,2,2), 2 residual blocks per level,
  self-attention at 16x16, dropout 0.1, sinusoidal timestep embedding, GroupNorm,
  strided-conv downsampling. `model.name=ddpm_unet` (cm/nets/ddpm_unet.py) has 35,746,307
  parameters, the published "35.7 million" (Appendix B). NCSN++ with DDPM blocks, no FIR,
  positional embedding and no input pyramid would have 35,218,947: it attends once per
  decoder level where DDPM attends after each of the three blocks at 16x16.
  The network receives the integer timestep t in 0..999 (as float32), embedded as is.
- Optimisation: Adam, lr 2e-4, batch 128 (Ho et al., Appendix B); linear warmup over
  5,000 steps and gradient clipping at global norm 1.0 (official code `run_cifar.py`;
  ddpm-torch `cifar10.json`: warmup 5000, grad_norm 1.0); EMA 0.9999, random horizontal
  flips, 800k steps (Appendix B).
- Evaluation: DDIM with eta = 0 at S = 10, 50 and 100 steps (`ddim10`, `ddim50`,
  `ddim100`; the DDIM paper's Table 1 reports FID 13.36 / 4.67 / 4.16 at these S) on the
  **quadratic** sub-sequence tau_i = floor((i sqrt(0.8 T) / (S - 1))^2), which is what those
  CIFAR-10 FIDs use (DDIM App. D.2: quadratic for CIFAR-10, linear for the other datasets;
  the official code's `skip_type == "quad"`, and ddpm-torch's CIFAR-10 example
  `--skip-schedule quadratic`). Where the official code's int cast repeats an early
  timestep (S >= 50), ours moves the later one up to the next free timestep, so that S
  distinct steps are taken (`cm/objectives/ddpm.py: timesteps`). Until 2026-12-06 this
  config sampled on the uniform sub-sequence. Which S the immiscible paper's DDIM curve
  uses is not recorded here and was not checked. `ddpm1000` (ancestral, sigma^2 = beta,
  FID 3.17 in Ho et al.) is by name: `--config.eval.samplers='("ddpm1000",)'`. FID-50k
  against the training set.
- Sample grids during training: DDIM 100 steps.

DDPM's loss reads neither `cm.metric` nor the consistency-model fields of `cm`.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    model = config.model
    model.name = "ddpm_unet"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    config.cm.loss = "ddpm"
    config.cm.metric = "l2"  # not read by the DDPM loss (always MSE on eps); for the record
    config.cm.num_timesteps = 1000
    config.cm.beta_schedule = "linear"
    config.cm.beta_start = 1e-4
    config.cm.beta_end = 0.02
    config.optim.optimizer = "adam"
    config.optim.lr = 2e-4
    config.optim.warmup = 5_000
    config.optim.grad_clip = 1.0
    config.training.batch_size = 128
    config.training.n_iters = 800_000
    config.training.ema_rates = (0.9999,)
    config.sample.solver = "ddim"
    config.sample.steps = 100
    config.sample.eta = 0.0
    config.sample.skip = "quadratic"  # DDIM App. D.2 (CIFAR-10)
    config.eval.samplers = ("ddim10", "ddim50", "ddim100")
    config.eval.eta = 0.0
    config.eval.skip = "quadratic"  # the sub-sequence of the DDIM paper's CIFAR-10 FIDs
    # Pair over the whole global batch, the same permutation on every process: the paper's
    # assignment batch (its SD code all-gathers and solves one problem); device/host as options.
    config.assignment.scope = "global"
    return base.with_arg(config, arg)
