"""Two writers: one trainer per workdir (a lock naming its holder, released on any exit,
stale after a crash), and `--mode eval` beside a trainer that rotates its snapshots."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from cm import train
from cm.runtime import checkpoints, run_lock
from evaluation import run as eval_run
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def other_process():
    """A live process that is not this one: the holder of a lock in the tests."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(workdir, **holder):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, run_lock.LOCK_FILE), "w") as f:
        json.dump(holder, f)


def holder_of(proc):
    return dataclasses.asdict(run_lock.Holder(socket.gethostname(), proc.pid,
                                              run_lock._process_start(proc.pid), "then"))


def test_lock_names_its_holder_and_is_released(tmp_path, other_process):
    workdir = str(tmp_path)
    with run_lock.hold(workdir):
        holder = run_lock.read_holder(workdir)
        assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
    assert run_lock.read_holder(workdir) is None  # released
    write_lock(workdir, **holder_of(other_process))
    with pytest.raises(run_lock.WorkdirLockedError,
                       match=f"process {other_process.pid} on host .* still running"):
        run_lock.acquire(workdir)
    with pytest.raises(run_lock.WorkdirLockedError):
        run_lock.check_free(workdir)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(workdir, **holder_of(dead))
    caplog.set_level("WARNING")
    run_lock.check_free(workdir)
    me = run_lock.acquire(workdir)
    assert me.pid == os.getpid()
    assert any(f"process {dead.pid}" in r.getMessage() and "gone" in r.getMessage()
               for r in caplog.records)
    run_lock.release(workdir, me)
    # A process id reused by another program (a different start time) is stale too.
    write_lock(workdir, host=socket.gethostname(), pid=os.getppid(), process_start="1",
               started="then")
    run_lock.release(workdir, run_lock.acquire(workdir))
    # A lock file torn by a crash between creating and writing it.
    with open(os.path.join(workdir, run_lock.LOCK_FILE), "w") as f:
        f.write('{"host": ')
    os.utime(os.path.join(workdir, run_lock.LOCK_FILE), (0, 0))
    run_lock.release(workdir, run_lock.acquire(workdir))


def test_lock_of_another_host_is_refused_with_what_to_do(tmp_path):
    write_lock(str(tmp_path), host="elsewhere", pid=1234, process_start="", started="then")
    with pytest.raises(run_lock.WorkdirLockedError, match="process 1234 on host elsewhere"
                       ".*if that run is over, delete"):
        run_lock.acquire(str(tmp_path))


def test_second_trainer_is_refused_and_writes_nothing(tmp_path, other_process):
    workdir = str(tmp_path / "run")
    write_lock(workdir, **holder_of(other_process))
    before = sorted(os.listdir(workdir))
    with pytest.raises(run_lock.WorkdirLockedError, match=str(other_process.pid)):
        train.train(tiny_config(), workdir)
    assert sorted(os.listdir(workdir)) == before
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from tests.helpers import tiny_config\n\n\n"
                           "def get_config():\n    return tiny_config()\n")
    result = subprocess.run(
        [sys.executable, "main.py", "--config", str(config_file), "--workdir", workdir],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"process {other_process.pid}" in errors[0], result.stderr
    assert sorted(os.listdir(workdir)) == before  # no log file, no config, no checkpoints


def test_lock_is_released_when_the_run_fails(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(**{"data.name": "npz", "data.path": str(tmp_path / "missing.npz")})
    with pytest.raises(Exception, match="does not exist"):
        train.train(config, workdir)
    assert run_lock.read_holder(workdir) is None


def test_eval_skips_a_planned_step_deleted_by_snapshot_rotation(tmp_path, monkeypatch, caplog):
    run_dir = str(tmp_path / "run")
    train.train(tiny_config(**{"training.n_iters": 2, "training.snapshot_every": 1,
                               "eval.n_samples": 8, "eval.batch_size": 8,
                               "eval.samplers": ("1step",),
                               "eval.cache_dir": str(tmp_path / "cache")}), run_dir)
    select = eval_run.select_steps

    def plan_then_rotate(*args):
        steps = select(*args)
        assert steps == [1, 2]
        # The trainer saves a new snapshot and rotates the oldest out.
        shutil.rmtree(os.path.join(run_dir, "checkpoints", "1"))
        return steps

    monkeypatch.setattr(eval_run, "select_steps", plan_then_rotate)
    caplog.set_level("WARNING")
    rows = eval_run.evaluate(None, run_dir)
    assert sorted({r["step"] for r in rows}) == [2]
    assert any("step 1 is gone" in r.getMessage() for r in caplog.records)
    ckpt = checkpoints.Checkpointer(run_dir)
    assert ckpt.snapshot_steps() == [2]
    ckpt.close()
