"""CIFAR-10 consistency distillation (CD) from an EDM teacher run.

Set the teacher's workdir (a run of configs/cifar10_edm.py) on the command line:
  python main.py --config configs/cifar10_cd.py --workdir runs/cd \\
      --config.cm.teacher_workdir=runs/edm
The teacher takes one Heun step from t_{n+1} to t_n with the same noise z the student
sees. Settings of the CD paper for CIFAR-10: fixed N = 18, target EMA mu = 0.95,
RAdam lr 4e-4, batch 512, 800k steps, NCSN++ as for CT, eval EMA 0.9999. Metric: the
paper used LPIPS, as here (cm/lpips.py; weights as in configs/cifar10_ct.py).
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "cifar10"
    config.cm.loss = "cd"
    config.cm.metric = "lpips"
    config.cm.start_scales = 18
    config.cm.end_scales = 18
    config.cm.start_ema = 0.95
    config.cm.teacher_workdir = "runs/cifar10_edm"
    config.optim.optimizer = "radam"
    config.optim.lr = 4e-4
    config.optim.warmup = 0
    config.training.batch_size = 512
    config.training.n_iters = 800_000
    config.training.ema_rates = (0.9999,)
    config.sample.ts = (80.0,)
    return base.with_arg(config, arg)
