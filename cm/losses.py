"""Training losses by name (`cm.loss`): each takes the noise `z` as an argument.

Signature: `loss(apply_fn, cfg, params, target_params, x, z, step, example_keys,
dropout_key, labels, **frozen) -> (loss, aux)`, where the frozen inputs are
`lpips_variables` (consistency losses with `cm.metric=lpips`) and `teacher_params` (CD).
"""

from collections.abc import Callable

from cm import consistency, ddpm, distill, edm

LOSS_FNS: dict[str, Callable] = {
    "ct": consistency.consistency_loss,
    "ict": consistency.consistency_loss,
    "edm": edm.edm_loss,
    "cd": distill.cd_loss,  # also takes teacher_params / teacher_apply_fn
    "ddpm": ddpm.ddpm_loss,
}
