"""CIFAR-10 consistency distillation (CD) from an EDM teacher run (Song et al. 2023).

Set the teacher's workdir (a run of configs/cifar10_edm.py) on the command line:
  python main.py --config configs/cifar10_cd.py --workdir runs/cd \\
      --config.cm.teacher_workdir=runs/edm
Values from the paper's hyperparameter table, CIFAR-10 CD column (REFERENCE.md):
- fixed discretisation N = 18 (`cm.start_scales = cm.end_scales = 18`);
- target EMA mu = 0: the target is the online network under stop-gradient
  (`cm.start_ema = 0`; 0.95 is the paper's ImageNet-64 / LSUN setting, and the OpenAI
  JAX code's CIFAR-10 CD config has no target EMA either);
- the student starts from its teacher as the OpenAI JAX code's `finetune=True` does
  (`jcm/losses.py: get_loss_fn`): online (and target) from the teacher's raw parameters,
  the EMA from the teacher's EMA (the PyTorch code copies the EMA into all three);
  `training.init_from` left empty means the teacher;
  `--config.training.init_from=none` trains the student from scratch;
- one Heun step of the teacher from t_{n+1} to t_n with the same noise z the student
  sees; metric LPIPS (cm/nets/lpips.py; weights as in configs/cifar10_ct.py);
- RAdam lr 4e-4, no warmup; batch 512; 800k iterations; eval EMA 0.9999; NCSN++ as
  for CT.
"""

from configs import base


def get_config(arg: str | None = None):
    config = base.get_config()
    config.data.name = "cifar10"
    config.cm.loss = "cd"
    config.cm.metric = "lpips"
    config.cm.start_scales = 18
    config.cm.end_scales = 18
    config.cm.start_ema = 0.0  # target = online params (mu = 0)
    config.cm.teacher_workdir = "runs/cifar10_edm"
    config.optim.optimizer = "radam"
    config.optim.lr = 4e-4
    config.optim.warmup = 0
    config.training.batch_size = 512
    config.training.n_iters = 800_000
    config.training.ema_rates = (0.9999,)
    config.sample.ts = (80.0,)
    # Pair over the whole global batch, the same permutation on every process: the paper's
    # assignment batch (its SD code all-gathers and solves one problem); device/host as options.
    config.assignment.scope = "global"
    return base.with_arg(config, arg)
