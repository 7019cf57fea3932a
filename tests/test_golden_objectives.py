"""Golden losses of a few training steps per objective, recorded from the code before the
objective table (main at 3b74413, 2026-12-05), so that restructuring is checked against
the old code rather than against itself.

Each run is the tiny digits config (8x8, the smallest NCSN++, batch 8) for 4 steps with
a learning rate that moves the parameters (so steps 2-4 see the updates), logged every
step. CT runs with exact pairing (`assignment.method=linear`), so the host pairing path
is in the loop too. CD distils from the EDM run, whose EMA rate is 0 (EMA = online
parameters), so its student starts from the same parameters whichever of the teacher's
parameter sets the init rule copies.

Tolerance: 1e-5 relative. The same machine reproduces these bitwise; another CPU
(other SIMD widths) differs in the last bits, about 1e-7 relative after 4 steps.
To record again (only when a change of the numbers is intended and explained):
`GOLDEN_RECORD=1 python -m pytest tests/test_golden_objectives.py -s -p no:xdist`.
"""

import json
import os

import numpy as np
import pytest

from cm import train
from tests.helpers import tiny_config

STEPS = 4
GOLDEN = {
    "ict": [5.254108905792236, 4.2064738273620605, 5.030301570892334, 4.226589202880859],
    "ct": [6.740085601806641, 0.14937430620193481, 0.07662103325128555, 0.05617871135473251],
    "edm": [2.0244383811950684, 1.8989429473876953, 1.4849375486373901, 1.7261064052581787],
    "ddpm": [1.0736958980560303, 1.0526303052902222, 0.9637349247932434, 1.0075013637542725],
    "cd": [0.2835000157356262, 0.12243951857089996, 0.2876672148704529, 0.16635577380657196],
}


def _config(loss: str, **overrides):
    base = {"cm.loss": loss, "training.n_iters": STEPS, "training.snapshot_every": STEPS,
            "optim.warmup": 0, "optim.lr": 2e-3, "optim.optimizer": "radam"}
    if loss == "ct":
        base.update({"cm.start_scales": 2, "cm.end_scales": 150,
                     "assignment.method": "linear"})
    if loss == "edm":
        base.update({"sample.solver": "heun", "sample.steps": 4,
                     "training.ema_rates": (0.0,)})
    if loss == "ddpm":
        base.update({"sample.solver": "ddim", "sample.steps": 4})
    if loss == "cd":
        base.update({"cm.start_scales": 18, "cm.end_scales": 18, "cm.start_ema": 0.0})
    base.update(overrides)
    return tiny_config(**base)


def _losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    out = {}
    for loss in ("ict", "ct", "edm", "ddpm"):
        run_dir = str(root / loss)
        train.train(_config(loss), run_dir)
        out[loss] = _losses(run_dir)
    run_dir = str(root / "cd")
    train.train(_config("cd", **{"cm.teacher_workdir": str(root / "edm")}), run_dir)
    out["cd"] = _losses(run_dir)
    if os.environ.get("GOLDEN_RECORD"):
        print("\nGOLDEN = " + json.dumps({k: [repr(v) for v in vs] for k, vs in out.items()}))
    return out


@pytest.mark.parametrize("loss", list(GOLDEN))
def test_losses_match_the_code_before_the_objective_table(runs, loss):
    got = runs[loss]
    assert len(got) == STEPS
    assert len(set(got)) == STEPS, got  # the parameters moved: every step's loss differs
    if os.environ.get("GOLDEN_RECORD"):
        pytest.skip("recording")
    np.testing.assert_allclose(got, GOLDEN[loss], rtol=1e-5)
