"""SIGTERM / SIGINT: the run finishes its step, saves a resume checkpoint there, exits
with 128 + signal, and a relaunch continues bitwise as if never stopped."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cm import train
from cm.runtime import checkpoints
from cm.setup import Setup
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No periodic checkpoints (like the default resume_every=1000 on a short run): whatever
# is saved between the start and the end comes from the signal.
OVERRIDES = {"training.n_iters": 24, "training.snapshot_every": 0,
             "training.resume_every": 1000}

# A real config file for main.py. Batches are slowed down (a sleep in the input thread,
# nothing else changes) so that the test's signal lands in the middle of the run.
CONFIG_FILE = textwrap.dedent("""
    import time

    from cm import data
    from tests.helpers import tiny_config

    _batch = data.Batcher.batch

    def _slow_batch(self, step):
        time.sleep(0.1)
        return _batch(self, step)

    data.Batcher.batch = _slow_batch

    def get_config():
        return tiny_config(**{overrides!r})
""")


def final_params(run_dir, config):
    ckpt = checkpoints.Checkpointer(run_dir)
    state = ckpt.restore(Setup(config).abstract_state())
    ckpt.close()
    return jax.device_get(state.params)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def metric_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    config = tiny_config(**OVERRIDES)
    train.train(config, run_dir)
    return final_params(run_dir, config)


def test_sigint_in_process_stops_after_the_step_with_a_checkpoint(
        tmp_path, monkeypatch):
    from cm.runtime import logs, preemption

    add, calls = logs.Meter.add, []

    def interrupt_during_step_3(self, diagnostics):  # the loop calls it once a step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 3 runs
        return add(self, diagnostics)

    monkeypatch.setattr(logs.Meter, "add", interrupt_during_step_3)
    config = tiny_config(**OVERRIDES)
    run_dir = str(tmp_path)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(preemption.Preempted, match="SIGINT after step 3") as info:
        train.train(config, run_dir)
    assert info.value.exit_code == 130 and info.value.step == 3
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back
    ckpt = checkpoints.Checkpointer(run_dir)
    assert sorted(ckpt.resume.all_steps()) == [3] and ckpt.snapshot_steps() == []
    ckpt.close()
    assert metric_steps(run_dir) == [1, 2, 3]  # the resume after SIGTERM below is bitwise


def run_main(config_file, run_dir, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               # The test process's compilation cache (conftest): compiled once for all.
               JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return subprocess.Popen([sys.executable, "main.py", "--config", config_file,
                             "--workdir", run_dir], cwd=ROOT, env=env, text=True, **kwargs)


def test_sigterm_to_a_real_trainer_checkpoints_the_step_and_resumes_bitwise(
        tmp_path, uninterrupted):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(CONFIG_FILE.format(overrides=OVERRIDES))
    run_dir = str(tmp_path / "run")
    n_iters = OVERRIDES["training.n_iters"]
    with open(tmp_path / "stderr", "w") as err:
        proc = run_main(str(config_file), run_dir, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while len(metric_steps(run_dir)) < 2:  # two steps done: the run is under way
                assert proc.poll() is None, open(tmp_path / "stderr").read()[-3000:]
                assert time.monotonic() < deadline, "the trainer made no progress"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            returncode = proc.wait(timeout=120)
        finally:
            proc.kill()
    stderr = open(tmp_path / "stderr").read()
    assert returncode == 143, stderr[-3000:]
    assert time.monotonic() - signalled < 60
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "stopped by SIGTERM" in line]
    assert len(lines) == 1, stderr[-3000:]
    step = int(re.search(r"after step (\d+)", lines[0]).group(1))
    assert 2 <= step < n_iters
    # The checkpoint is the last step the run finished (and logged); nothing half-written.
    assert metric_steps(run_dir)[-1] == step
    ckpt = checkpoints.Checkpointer(run_dir)
    assert sorted(ckpt.resume.all_steps()) == [step] and ckpt.snapshot_steps() == []
    ckpt.close()
    for sub in ("resume", "checkpoints"):
        assert not [n for n in os.listdir(os.path.join(run_dir, sub)) if "tmp" in n]

    with open(tmp_path / "stderr2", "w") as err:
        relaunch = run_main(str(config_file), run_dir, stdout=subprocess.DEVNULL, stderr=err)
        assert relaunch.wait(timeout=300) == 0, open(tmp_path / "stderr2").read()[-3000:]
    assert f"resumed from step {step}" in open(tmp_path / "stderr2").read()
    assert metric_steps(run_dir) == list(range(1, n_iters + 1))
    assert_same(final_params(run_dir, tiny_config(**OVERRIDES)), uninterrupted)
