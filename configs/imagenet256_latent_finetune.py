"""The fine-tuning row of the paper's SD experiment: batch 512 for 5,000 steps from a
trained model (their FIDs 11.45 vanilla, 10.38 KNN, 10.28 linear fine-tune SD itself;
SD's UNet is not ported here, so this fine-tunes a run of configs/imagenet256_latent.py):
  python main.py --config configs/imagenet256_latent_finetune.py --workdir runs/in256_ft \\
      --config.training.init_from=runs/in256 --config.assignment.method=linear
"""

from configs import base, imagenet256_latent


def get_config(arg: str | None = None):
    config = imagenet256_latent.get_config()
    config.training.batch_size = 512
    config.training.n_iters = 5_000
    config.training.snapshot_every = 1_000
    config.training.init_from = "runs/in256"
    return base.with_arg(config, arg)
