"""Errors as one line: a config that cannot run, an unwritable workdir, a file that is not
what it claims; exit status 2 for usage errors, and nothing created by a refused run."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cm import config as config_lib
from cm import data
from cm.config import ConfigError
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    # The test environment's 8 simulated CPU devices (conftest) reach the subprocess.
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)


def assert_one_line(result, code, message):
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


@pytest.mark.parametrize("override, message", [
    ("training.batch_size=12", "multiple of the 8 devices"),
    ("assignment.method=hungarian", "unknown assignment.method"),
    ("cm.loss=ctt", "cm.loss"),
    ("cm.metric=l3", "cm.metric"),
    ("assignment.k=0", "assignment.k must be >= 1"),
])
def test_config_errors_are_one_line_with_exit_2_and_create_nothing(tmp_path, override,
                                                                   message):
    workdir = tmp_path / "run"
    result = run_main("--config", "configs/quickstart.py", f"--config.{override}",
                      "--workdir", str(workdir))
    assert_one_line(result, 2, message)
    assert not workdir.exists()  # not even an empty log file


def test_config_errors_in_process_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of"):
        config_lib.for_training(tiny_config(**{"training.batch_size": 12}))
    with pytest.raises(ConfigError, match="assignment.k"):
        config_lib.for_training(tiny_config(**{"assignment.k": 0}))


def test_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_main("--config", "configs/quickstart.py", "--workdir", str(blocker / "run"))
    assert_one_line(result, 2, "cannot write to --workdir")


def test_sample_mode_on_a_mistyped_workdir_creates_nothing(tmp_path):
    workdir = tmp_path / "rnu"
    result = run_main("--mode", "sample", "--workdir", str(workdir))
    assert_one_line(result, 1, "no checkpoint in")
    assert not workdir.exists()


def test_a_text_file_named_npz_is_one_clear_error(tmp_path):
    path = tmp_path / "images.npz"
    path.write_text("this is not an archive\n")
    with pytest.raises(data.DatasetError, match="not an .npz archive"):
        data.load_npz_with_labels(str(path))
    np.save(tmp_path / "array.npy", np.zeros((2, 8, 8), np.uint8))
    os.rename(tmp_path / "array.npy", tmp_path / "array.npz")
    with pytest.raises(data.DatasetError, match="single .npy array"):
        data.load_npz_with_labels(str(tmp_path / "array.npz"))
    result = run_main("--config", "configs/quickstart.py", "--config.data.name=npz",
                      f"--config.data.path={path}", "--workdir", str(tmp_path / "run"))
    assert_one_line(result, 1, "not an .npz archive")
    assert "pickle" not in result.stderr
