"""ImageNet-256 class-conditional latent diffusion: the immiscible paper's Stable Diffusion
row in this project's terms, for GPUs (print-only here: no ImageNet, no SD weights).

The authors' setting (their `Linear_Assignment-stable_diffusion/` and
`KNN-stable_diffusion/` READMEs, REFERENCE.md): latents of SD's autoencoder
`stabilityai/sd-vae-ft-mse` (256x256 -> 32x32x4, scaling factor 0.18215), class-conditional,
from scratch at batch 2048 for 20,000 steps; FID of 10,000 samples with 20 sampling steps
(17.92 vanilla, 16.84 KNN k = 64, 16.43 linear). What differs here, and why:
- the network is the project's DDPM U-Net (ch 128, ch_mult (1, 2, 2, 2), attention at 16
  and 8) with a class embedding, not SD's 860M text-conditioned UNet, which is not ported
  (its Flax version left diffusers in v0.40; docs/latent.md says what a user would need);
  class labels replace the authors' class-name prompts;
- the objective is DDPM's eps loss with T = 1000 linear betas and DDIM-20 sampling (SD
  uses its scaled-linear betas 0.00085..0.012 and PNDM by default);
- Adam lr 1e-4 (diffusers' text_to_image default, which the authors' scripts build on),
  no warmup, EMA 0.9999, clipping at 1;
- the pairing is over the whole global batch (`assignment.scope=global`; the authors
  all-gather and solve one 2048 x 2048 problem), unsquared L2 in float16 as theirs.
Images: `tfds:imagenet2012` resized to 256x256 (no crop: the aspect ratio is not kept;
for LDM's shorter-side resize and center crop, prepare a folder of 256x256 crops and use
`data.name=folder`). Encode once, then train:
  python main.py --config configs/imagenet256_latent.py --workdir runs/in256 --mode encode
  python main.py --config configs/imagenet256_latent.py --workdir runs/in256
`configs/imagenet256_latent_finetune.py`: the fine-tuning row.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "tfds:imagenet2012"
    config.data.image_size = 256
    config.data.num_channels = 3
    config.data.random_flip = True  # both orientations are encoded (docs/latent.md)
    config.latent.autoencoder = "stabilityai/sd-vae-ft-mse"
    config.latent.factor = 8
    config.latent.channels = 4
    config.latent.encode_batch = 64
    model = config.model
    model.name = "ddpm_unet"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16, 8)
    model.dropout = 0.0
    model.num_classes = 1000
    config.cm.loss = "ddpm"
    config.assignment.scope = "global"
    config.assignment.dtype = "float16"
    config.assignment.k = 64  # the authors' KNN on SD latents
    config.optim.optimizer = "adam"
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = 1.0
    config.training.batch_size = 2048
    config.training.n_iters = 20_000
    config.training.ema_rates = (0.9999,)
    config.training.snapshot_every = 2_000
    config.training.keep_snapshots = 10
    config.sample.solver = "ddim"
    config.sample.steps = 20
    config.eval.samplers = ("ddim20",)
    config.eval.n_samples = 10_000
    config.eval.features = "inception"
    return base.with_arg(config, arg)
