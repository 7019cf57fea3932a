"""The training loop's figures: loss_avg's window, the Meter's rates, non-finite losses.

References come from the test: loss_avg from the per-step losses of a run that logs
every step (plain means), the Meter's rates from a fake clock's times (arithmetic done
here), and the step of an injected infinite loss from where it was injected.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cm import train, train_step
from cm.runtime import checkpoints, logs
from tests.helpers import tiny_config


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class FakeClock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_meter_rates_and_window_from_a_fake_clock():
    # Resumed at step 10 of 110, global batch 32; the window starts at t = 100 s.
    meter = logs.Meter(10, 110, 32, clock=FakeClock([100.0, 102.0, 103.0, 107.0]))
    meter.add({"reduction": 1.0})
    meter.add({"reduction": 3.0})
    rates, means = meter.read(14, waited_seconds=0.5)  # 4 steps in 2 s
    assert rates["steps_per_sec"] == pytest.approx(2.0)
    assert rates["images_per_sec"] == pytest.approx(64.0)
    assert rates["input_wait_fraction"] == pytest.approx(0.25)
    assert rates["seconds_left"] == pytest.approx((110 - 14) / 2.0)
    assert means == {"reduction": pytest.approx(2.0)}
    # The next window starts where this one ended: 2 steps in 1 s, its own diagnostics.
    rates, means = meter.read(16, waited_seconds=0.1)
    assert rates["steps_per_sec"] == pytest.approx(2.0)
    assert rates["images_per_sec"] == pytest.approx(64.0)
    assert rates["input_wait_fraction"] == pytest.approx(0.1)
    assert means == {}
    rates, _ = meter.read(24, waited_seconds=0.0)  # 8 steps in 4 s
    assert rates["steps_per_sec"] == pytest.approx(2.0)
    assert rates["seconds_left"] == pytest.approx((110 - 24) / 2.0)


def test_loss_avg_averages_the_steps_since_the_previous_log_line(tmp_path):
    """Logging every 2 steps of 5: windows (1, 2), (3, 4) and the final step's (5), which
    is logged although 5 is not a multiple of log_every."""
    base = {"training.n_iters": 5, "training.snapshot_every": 0, "optim.warmup": 0}
    every, pairs = str(tmp_path / "every"), str(tmp_path / "pairs")
    train.train(tiny_config(**base, **{"training.log_every": 1}), every)
    last = train.train(tiny_config(**base, **{"training.log_every": 2}), pairs)
    one = {r["step"]: r for r in read_metrics(every)}
    two = {r["step"]: r for r in read_metrics(pairs)}
    assert sorted(one) == [1, 2, 3, 4, 5] and sorted(two) == [2, 4, 5]
    assert last["step"] == 5
    for s in one:  # a window of one step: its own loss
        assert one[s]["loss_avg"] == pytest.approx(one[s]["loss"], rel=1e-6)
    losses = [one[s]["loss"] for s in (1, 2, 3, 4, 5)]
    assert len(set(losses)) == 5  # the windows' means below can tell them apart
    assert two[2]["loss_avg"] == pytest.approx(np.mean(losses[:2]), rel=1e-6)
    assert two[4]["loss_avg"] == pytest.approx(np.mean(losses[2:4]), rel=1e-6)
    assert two[5]["loss_avg"] == pytest.approx(losses[4], rel=1e-6)
    assert two[5]["loss"] == one[5]["loss"]


def test_an_infinite_loss_between_log_steps_stops_before_its_checkpoint(tmp_path,
                                                                       monkeypatch):
    """Two steps per call; the first loss of the second call (step 3) is made +inf. The
    loop checks losses only at log steps (6) and before checkpoints: the snapshot of
    step 4 must not be written, and the error names step 3."""
    real = train_step.make_train_step

    def make(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), []

        def step(state, batch, frozen):
            state, metrics = step_fn(state, batch, frozen)
            calls.append(1)
            if len(calls) == 2:
                metrics = dict(metrics, losses=metrics["losses"].at[0].set(jnp.inf))
            return state, metrics

        return step

    monkeypatch.setattr(train_step, "make_train_step", make)
    config = tiny_config(**{"training.n_iters": 6, "training.log_every": 6,
                            "training.snapshot_every": 2, "training.steps_per_call": 2})
    with pytest.raises(FloatingPointError, match=r"loss is inf at step 3;"):
        train.train(config, str(tmp_path))
    assert checkpoints.listed_steps(str(tmp_path)) == [2]
