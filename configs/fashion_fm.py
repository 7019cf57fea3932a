"""Flow matching on Fashion-MNIST at 16x16: the CPU benchmark of immiscible pairing against
exact minibatch OT (docs/results.md, "Flow matching on Fashion-MNIST").

Data, network and optimiser are those of `configs/fashion_ddpm.py` (the 60,000 training
images at 16x16, batch 64, 2,000 steps, the DDPM U-Net at ch 16 with 280,177 parameters,
Adam lr 1e-3 with 100 warmup steps, clipping at 1, EMA 0.995), so the two objectives
can be read side by side; the objective is flow matching (`cm.loss=fm`, straight paths,
t uniform, velocity z - x; cm/objectives/fm.py). Evaluation: `fd_fashion` of 2,000
samples at every snapshot (10), with Euler in 10 steps and the adaptive Dormand-Prince
solver at rtol = atol = 1e-2 (`dopri5_1e-2`; its network calls are recorded per row).
Why not torchcfm's 1e-5 and 5,000 samples: measured on a 200-step model here, `dopri5`
at 1e-5 took 291 network calls per image (14.6 minutes per snapshot of 5,000 on 2 CPU
cores), at 1e-3 43 and at 1e-2 31, with fd_fashion 125.85 / 126.28 / 126.14 against
Euler-10's 125.88 (5,000 / 1,000 / 1,000 / 5,000 samples): 12 runs x 10 snapshots at 1e-5
would take 29 hours here.

The couplings of the sweep (docs/results.md): `assignment.method=none` (I-CFM),
`linear` with `assignment.cost=l2` (immiscible, the authors' cost), `linear` with
`assignment.cost=sqeuclidean` (exact minibatch OT without replacement), `knn` with k = 4
(the authors' flow-matching setting), all with `assignment.scope=host` (the whole batch,
as the authors and torchcfm pair on one GPU).
"""

from configs import base, fashion_ddpm


def get_config(arg: str | None = None):
    config = fashion_ddpm.get_config()
    config.cm.loss = "fm"
    config.assignment.scope = "host"
    config.assignment.k = 4
    config.sample.solver = "euler"
    config.sample.steps = 10
    config.eval.samplers = ("euler10", "dopri5_1e-2")
    config.eval.n_samples = 2000
    return base.with_arg(config, arg)
