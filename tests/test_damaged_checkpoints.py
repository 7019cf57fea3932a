"""A damaged newest checkpoint: named in a warning, the next newest good one restored,
the run goes on; one clear error when none restores. A torn last metrics line is dropped."""

import glob
import json
import os
import subprocess
import sys

import pytest

from cm import train
from cm.runtime import checkpoints, logs
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"training.n_iters": 8, "training.snapshot_every": 3,
             "training.resume_every": 2}


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def truncate_a_file(step_dir):
    data_file = sorted(glob.glob(os.path.join(step_dir, "default", "d", "*")))[0]
    with open(data_file, "r+b") as f:
        f.truncate(10)


def remove_a_file(step_dir):
    os.remove(sorted(glob.glob(os.path.join(step_dir, "default", "d", "*")))[-1])


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory):
    """A run stopped after step 6 of 8: snapshots 3 and 6, resume checkpoints 2 and 4."""
    run_dir = str(tmp_path_factory.mktemp("stopped"))
    train.train(tiny_config(**OVERRIDES), run_dir, stop_after=6)
    ckpt = checkpoints.Checkpointer(run_dir)
    assert ckpt.snapshot_steps() == [3, 6] and 4 in ckpt.resume.all_steps()
    ckpt.close()
    return run_dir


def copy_of(run_dir, tmp_path):
    import shutil

    dest = str(tmp_path / "run")
    shutil.copytree(run_dir, dest)
    return dest


def test_damaged_newest_checkpoints_are_skipped_and_set_aside(stopped_at_6, tmp_path, caplog):
    run_dir = copy_of(stopped_at_6, tmp_path)
    before = read_metrics(run_dir)
    truncate_a_file(os.path.join(run_dir, "checkpoints", "6"))  # the newest: a snapshot
    remove_a_file(os.path.join(run_dir, "resume", "4"))  # the next: a resume checkpoint
    caplog.set_level("WARNING")
    last = train.train(tiny_config(**OVERRIDES), run_dir)
    assert last["step"] == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for damaged in ("checkpoints/6", "resume/4"):
        assert any(f"{damaged} cannot be restored" in w for w in warnings), warnings
    assert any("restored step 3" in w for w in warnings), warnings
    # The damaged ones are kept for inspection, out of the way of the steps trained again.
    assert sorted(n.rsplit("-", 2)[0] for n in os.listdir(os.path.join(run_dir, "damaged"))) \
        == ["checkpoints-6", "resume-4"]
    ckpt = checkpoints.Checkpointer(run_dir)
    assert ckpt.snapshot_steps() == [3, 6, 8]
    ckpt.close()
    after = read_metrics(run_dir)
    assert sorted(after) == list(range(1, 9))
    for step in (4, 5, 6):  # trained again from step 3: the same batches, the same losses
        assert after[step]["loss"] == before[step]["loss"]


def damage_all(run_dir):
    for step_dir in glob.glob(os.path.join(run_dir, "checkpoints", "*")) + glob.glob(
            os.path.join(run_dir, "resume", "*")):
        truncate_a_file(step_dir)


def test_no_restorable_checkpoint_is_one_clear_error(stopped_at_6, tmp_path):
    run_dir = copy_of(stopped_at_6, tmp_path)
    damage_all(run_dir)
    with pytest.raises(checkpoints.CheckpointError, match="none of the 4 checkpoints"):
        train.train(tiny_config(**OVERRIDES), run_dir)
    assert not os.path.exists(os.path.join(run_dir, "damaged"))  # nothing moved
    # From the command line: one line, no traceback.
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from tests.helpers import tiny_config\n\n\ndef get_config():\n"
                           f"    return tiny_config(**{OVERRIDES!r})\n")
    result = subprocess.run(
        [sys.executable, "main.py", "--config", str(config_file), "--workdir", run_dir],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 4 checkpoints" in errors[0], result.stderr[-3000:]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(rows) + '{"step": 4, "lo')  # killed in the middle of a write
    caplog.set_level("WARNING")
    logs.MetricWriter(str(tmp_path), resume_step=2, tensorboard=False).close()
    assert path.read_text() == "".join(rows[:2])
    assert any("torn last line" in r.getMessage() for r in caplog.records)
    # A torn line with nothing to truncate is dropped too, so the next record starts cleanly.
    path.write_text("".join(rows) + '{"step": 4, "lo')
    writer = logs.MetricWriter(str(tmp_path), resume_step=3, tensorboard=False)
    writer.write(4, {"loss": 2.0})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
