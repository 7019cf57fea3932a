"""The benchmark scripts run (on the 8 simulated CPU devices), report what they claim,
and refuse a step that does not fit the device instead of crashing on it."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from bench import train_step as bench_step
from bench import train_throughput
from tests.helpers import MINIMAL_NET, override


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)


def small():
    """3x32x32 images at batch 16 through the smallest NCSN++ (the bench's plumbing is
    tested, not the network): one compiled step that the tests share."""
    return override(train_throughput.cifar_shaped(16), **MINIMAL_NET)


def rows(text: str) -> dict:
    """method -> (img/s, ratio to none) from the printed table."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "cifar":
            out[parts[1]] = (float(parts[2]), float(parts[3]))
    return out


def test_throughput_shares_one_program_across_host_methods(images, capsys):
    config = small()
    ok = train_throughput.bench_config("cifar", config, images,
                                       ["none", "linear", "knn@device"], steps=1, windows=1)
    text = capsys.readouterr().out
    assert ok
    # One program for the host path (none and linear) and one for in-step knn.
    assert text.count("step memory:") == 2, text
    table = rows(text)
    assert set(table) == {"none", "linear", "knn@device"}, text
    assert table["none"][1] == 1.0
    assert all(rate > 0 for rate, _ in table.values())


def test_throughput_skips_a_step_larger_than_the_device(images, capsys, monkeypatch):
    monkeypatch.setattr(bench_step, "device_limit", lambda: 1024.0)
    ok = train_throughput.bench_config("cifar", small(), images,
                                       ["none", "linear"], steps=1, windows=1)
    text = capsys.readouterr().out
    assert not ok
    assert "skipped: the step needs" in text and "device limit 0.00 GiB" in text
    assert rows(text) == {}  # nothing was timed


def test_train_step_bench_reports_flops_memory_and_breakdown():
    config = small()
    config.data.name = "digits"  # the bench builds its own random batch of this shape
    config.data.image_size, config.data.num_channels = 32, 3
    r = bench_step.benchmark(config, steps=1, windows=1)
    assert r["steps_per_s"] > 0 and r["images_per_s"] == pytest.approx(16 * r["steps_per_s"])
    assert r["flops_per_step"] > 1e9  # a NCSN++ forward and backward over 16 images
    assert "scratch" in r["memory"] and r["update_s"] > 0 and r["transfer_s"] > 0
    # Host time per call: positive, and (asynchronous dispatch) at most the call's share.
    assert 0 < r["dispatch_s"] <= 1.0 / r["steps_per_s"] and r["update_dispatch_s"] > 0
    assert "fraction_of_peak" not in r  # no known peak on a CPU


def test_train_step_bench_refuses_a_step_larger_than_the_device(monkeypatch):
    monkeypatch.setattr(bench_step, "device_limit", lambda: 1024.0)
    config = small()
    with pytest.raises(SystemExit, match="device limit 0.00 GiB.*more than the 0.0 GiB"):
        bench_step.benchmark(config, steps=1, windows=1, breakdown=False)


def test_throughput_reports_running_out_of_memory(images, capsys, monkeypatch):
    def oom_runner(shared, step_fn, pipe):
        def run(n):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while "
                                             "trying to allocate 59318312960 bytes.")
        return run, {"s": 0.0}

    monkeypatch.setattr(train_throughput, "make_runner", oom_runner)
    ok = train_throughput.bench_config("cifar", small(), images,
                                       ["none", "linear"], steps=1, windows=1)
    text = capsys.readouterr().out
    assert not ok
    assert "out of device memory: RESOURCE_EXHAUSTED" in text and rows(text) == {}


def test_gpu_report_command_lines_run(tmp_path):
    """bench/gpu_report.sh (run rarely, on a borrowed GPU) with its :smoke networks on the
    CPU: the command lines of its `ct` section (the bare step and the throughput through
    the input path, the modules and flags the `assign`, `edm` and `huber` sections use
    too) parse and run, in bfloat16. The `fid` section's command (bench/fid.py, last run
    on the H200 as it stands) is left out here: 14 s of Inception on the CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # One CPU device (not the suite's 8): the same commands; the bare step's command took
    # 26 s instead of 30 s here.
    env = dict(os.environ, SMOKE="1", SECTIONS="ct", DTYPES="bfloat16",
               PYTHON=sys.executable, LIMIT="300",
               XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir))
    proc = subprocess.run(["bash", os.path.join(root, "bench", "gpu_report.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "failed:" not in out and "== done" in out
    assert "step memory:" in out and "GFLOP/step" in out and "optimiser + EMA update" in out
    assert "host time per step:" in out
    assert re.search(r"cifar10_ct\s+linear\s+[\d.]+\s+[\d.]+", out), out


def test_memory_table_compiles_and_saved_activations_fall_with_microbatches_and_remat():
    """bench.memory on the quickstart's shape: the step compiles (XLA's own figures), and
    the activations kept for the backward pass (JAX's saved residuals of one microbatch)
    halve with 2 microbatches and fall with remat (measured: to 0.36x)."""
    from bench import memory

    config = memory.load_config("configs/quickstart.py:smoke")
    config.training.batch_size = 16
    mem, saved, args = memory.step_memory(config, 1, False, "float32", 1)
    assert mem.temp_size_in_bytes > 0 and args > 0 and saved > 0
    _, halved, _ = memory.step_memory(config, 2, False, "float32", 1, compile_step=False)
    _, remat, _ = memory.step_memory(config, 1, True, "float32", 1, compile_step=False)
    assert halved == pytest.approx(saved / 2, rel=0.02)
    assert remat < 0.7 * saved, (remat, saved)
    assert memory.fits(10e9) == "24/48/80 GB" and memory.fits(60e9) == "80 GB"
    assert memory.fits(100e9) == "none"
