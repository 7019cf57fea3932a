"""What a relaunch in a workdir may change: the saved run's parameterisation never, its
training objective not when training, everything else with a record of the change."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from cm import train
from cm.runtime import workdir
from tests.helpers import override, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Samplers that each diffusion loss accepts (train.validate checks them).
SAMPLERS = {"edm": {"sample.solver": "heun", "eval.samplers": ("heun18",)},
            "ddpm": {"sample.solver": "ddim", "eval.samplers": ("ddim10",)}}


def loss_config(loss, **fields):
    return tiny_config(**{"cm.loss": loss, **SAMPLERS.get(loss, {}), **fields})


def saved_run(tmp_path, loss, **fields):
    """A workdir whose config.json is loss_config(loss, **fields); returns its path."""
    run_dir = str(tmp_path / "run")
    workdir.write_config(run_dir, loss_config(loss, **fields))
    return run_dir


# What the saved parameters compute: F's inputs and outputs are scaled with sigma_min and
# sigma_data (CT, iCT, CD; EDM's preconditioning with sigma_data), and a DDPM network
# predicts the noise of timestep t under its beta schedule.
MEANING = [
    ("ict", "cm.sigma_data", 0.25),
    ("ct", "cm.sigma_min", 0.01),
    ("edm", "cm.sigma_data", 1.0),
    ("ddpm", "cm.beta_schedule", "cosine"),
    ("ddpm", "cm.num_timesteps", 500),
    ("ddpm", "cm.beta_end", 0.01),
]


@pytest.mark.parametrize("loss, field, value", MEANING)
def test_a_changed_parameterisation_is_refused_for_training_and_sampling(tmp_path, loss,
                                                                        field, value):
    run_dir = saved_run(tmp_path, loss)
    before = open(workdir.config_path(run_dir)).read()
    config = loss_config(loss, **{field: value})
    for training in (True, False):
        with pytest.raises(workdir.IncompatibleWorkdirError, match=field.replace(".", r"\.")):
            train.check_compatible(run_dir, config, training=training)
    with pytest.raises(workdir.IncompatibleWorkdirError, match=field.replace(".", r"\.")):
        train.train(config, run_dir)
    assert open(workdir.config_path(run_dir)).read() == before
    assert sorted(os.listdir(run_dir)) == ["config.json"]


# The objective: the curriculum, the noise-level distribution, the target EMA and the
# distance. Sampling from the checkpoints with other values is fine.
OBJECTIVE = [
    ("ict", {}, "cm.p_mean", -1.0),
    ("ict", {}, "cm.end_scales", 200),
    ("ict", {}, "cm.huber_c", 0.1),  # the quickstart's metric is pseudo_huber
    ("ct", {}, "cm.start_ema", 0.95),
    ("ct", {}, "cm.sigma_max", 40.0),
    ("ct", {"cm.metric": "lpips"}, "cm.lpips_resize", 64),
    ("cd", {}, "cm.rho", 5.0),
    ("edm", {}, "cm.p_std", 1.0),
]


@pytest.mark.parametrize("loss, base, field, value", OBJECTIVE)
def test_a_changed_objective_is_refused_for_training_only(tmp_path, loss, base, field,
                                                         value):
    run_dir = saved_run(tmp_path, loss, **base)
    config = loss_config(loss, **{field: value}, **base)
    with pytest.raises(workdir.IncompatibleWorkdirError, match=field.replace(".", r"\.")):
        train.check_compatible(run_dir, config)
    assert train.check_compatible(run_dir, config, training=False) == [field]


# Fields that the saved run's loss never reads: a relaunch may change them (they are
# logged and recorded as any other change).
UNREAD = [
    ("ddpm", {}, "cm.sigma_data", 0.25),
    ("ddpm", {}, "cm.end_scales", 200),
    ("ict", {}, "cm.beta_schedule", "cosine"),
    ("ict", {}, "cm.start_ema", 0.5),  # iCT's target is the online network
    ("ict", {}, "cm.lpips_resize", 64),  # pseudo_huber
    ("ct", {"cm.metric": "lpips"}, "cm.huber_c", 0.1),
    ("edm", {}, "cm.metric", "l2"),  # EDM's loss is its weighted l2 whatever the metric
    ("edm", {}, "cm.end_scales", 200),
]


@pytest.mark.parametrize("loss, base, field, value", UNREAD)
def test_fields_the_saved_loss_does_not_read_may_change(tmp_path, loss, base, field, value):
    run_dir = saved_run(tmp_path, loss, **base)
    config = loss_config(loss, **{field: value}, **base)
    assert train.check_compatible(run_dir, config) == [field]


def test_a_field_added_after_the_run_started_is_not_a_change(tmp_path):
    """A config.json written before a field existed: the run used what is now its
    default, so the same command still resumes (model.dtype is a shape field)."""
    run_dir = saved_run(tmp_path, "ddpm")
    path = workdir.config_path(run_dir)
    saved = json.load(open(path))
    del saved["model"]["dtype"], saved["cm"]["beta_schedule"], saved["optim"]["decay"]
    json.dump(saved, open(path, "w"))
    assert train.check_compatible(run_dir, loss_config("ddpm")) == []


def ct_config(n_iters, **fields):
    return tiny_config(**{"cm.loss": "ct", "cm.start_scales": 2, "cm.end_scales": 150,
                          "cm.start_ema": 0.9, "training.n_iters": n_iters,
                          "optim.warmup": 0, "optim.lr": 1e-3, **fields})


def test_a_longer_run_says_how_its_schedules_jump_at_the_resume_step(tmp_path):
    """Against the CT paper's formulas (REFERENCE.md) in plain Python: N(k) = ceil(sqrt(k/K
    ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, mu(k) = exp(s0 ln(mu0) / N(k)), and a cosine
    learning rate lr (1 + cos(pi k / K)) / 2."""
    k, s0, s1, mu0, lr = 50, 2, 150, 0.9, 1e-3

    def n_scales(total):
        return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1

    def mu(total):
        return math.exp(s0 * math.log(mu0) / n_scales(total))

    def cosine(total):
        return lr * (1 + math.cos(math.pi * k / total)) / 2

    run_dir = str(tmp_path / "run")  # the saved config as the trainer reads it back
    workdir.write_config(run_dir, ct_config(100, **{"optim.decay": "cosine"}))
    saved = ml_collections.ConfigDict(workdir.saved_dict(run_dir))
    longer = ct_config(300, **{"optim.decay": "cosine"})
    lines = train.schedule_jumps(saved, longer, k)
    assert n_scales(100) == 107 and n_scales(300) == 62  # far apart: a real jump
    assert len(lines) == 3, lines
    assert all(line.startswith("training.n_iters changed from 100 to 300: at step 50 ")
               for line in lines)
    assert lines[0].endswith(f"N(k) goes from {n_scales(100)} to {n_scales(300)}")
    assert lines[1].endswith(f"mu(k) from {mu(100):.6g} to {mu(300):.6g}")
    assert lines[2].endswith(f"learning rate from {cosine(100):.6g} to {cosine(300):.6g}")
    # Nothing moves: the same length, or a loss and learning rate that ignore it.
    assert train.schedule_jumps(saved, ct_config(100, **{"optim.decay": "cosine"}), k) == []
    edm = {"cm.loss": "edm"}
    assert train.schedule_jumps(ct_config(100, **edm), ct_config(300, **edm), k) == []


def test_relaunch_records_what_it_changed_with_the_step(tmp_path, caplog):
    """A run interrupted after step 3 and relaunched with another learning rate and
    snapshot count: config.json holds the new values, config_changes.jsonl the old ones."""
    run_dir = str(tmp_path / "run")
    config = tiny_config()
    train.train(config, run_dir, stop_after=3)
    assert not os.path.exists(os.path.join(run_dir, "config_changes.jsonl"))
    override(config, **{"optim.lr": 5e-4, "training.keep_snapshots": 5})
    with caplog.at_level("WARNING"):
        train.train(config, run_dir)
    assert ("config differs from the saved one in: optim.lr, training.keep_snapshots"
            in caplog.text)
    with open(os.path.join(run_dir, "config_changes.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1
    assert rows[0]["step"] == 3
    assert rows[0]["changed"] == {"optim.lr": [1e-3, 5e-4], "training.keep_snapshots": [3, 5]}
    assert workdir.load_config(run_dir).optim.lr == 5e-4


def test_main_refuses_an_incompatible_workdir_before_writing_its_log(tmp_path):
    run_dir = str(tmp_path / "run")
    from configs import quickstart

    workdir.write_config(run_dir, quickstart.get_config())
    result = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/quickstart.py", "--workdir", run_dir,
         "--config.cm.sigma_data=0.25"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "cm.sigma_data: saved 0.5, now 0.25" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(run_dir)) == ["config.json"]
