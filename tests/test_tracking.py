"""Weights & Biases logging (`training.wandb`), run for real in wandb's offline mode, with
its `Run.log` wrapped to see what the project sent; and never imported when off."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cm import train
from cm.runtime import tracking
from tests.helpers import ROOT, tiny_config

wandb = pytest.importorskip("wandb")


def test_metrics_grids_config_and_eval_rows_reach_one_resumable_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, inits = [], []
    real_log, real_init = wandb.sdk.wandb_run.Run.log, wandb.init

    def log(self, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kwargs)

    def init(**kwargs):
        inits.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    monkeypatch.setattr(wandb, "init", init)
    run_dir = str(tmp_path / "run")
    config = tiny_config(**{"training.wandb": "immiscible-test", "training.n_iters": 2,
                            "training.snapshot_every": 2, "training.sample_every": 2,
                            "training.log_every": 1, "eval.samplers": ("1step",),
                            "eval.n_samples": 16, "eval.batch_size": 8,
                            "eval.stats_path": str(tmp_path / "ref.npz")})
    train.train(config, run_dir)
    from evaluation import run as eval_run

    (row,) = eval_run.evaluate(None, run_dir)
    # One W&B run per workdir, the same id for training and evaluation (and a resume).
    ids = {kw["id"] for kw in inits}
    assert ids == {tracking.run_id(run_dir)} and len(inits) == 2
    assert inits[0]["project"] == "immiscible-test" and inits[0]["name"] == "run"
    assert inits[0]["config"]["training"]["n_iters"] == 2  # the whole config
    steps = [step for step, data in logged if "loss" in data]
    assert steps == [1, 2]
    assert any("samples" in data and step == 2 for step, data in logged)
    (ev,) = [data for step, data in logged if "eval/step" in data]
    assert ev["eval/step"] == 2 and ev["eval/1step/fd_pixels"] == pytest.approx(row["fd_pixels"])
    assert np.isfinite(ev["eval/1step/fd_pixels"])
    runs = os.listdir(os.path.join(run_dir, "wandb"))
    assert any(r.startswith("offline-run-") and r.endswith(tracking.run_id(run_dir))
               for r in runs), runs


def test_wandb_is_not_imported_unless_asked_for():
    code = ("import sys; from cm import train, sample_run; from evaluation import run; "
            "import main; print('wandb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
