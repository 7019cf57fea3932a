"""Multi-host training for real: two JAX processes on this machine (CPU devices, gloo
collectives, coordinator on 127.0.0.1) against one process over the same global batch.

Every process runs as a subprocess with a timeout, so a hang fails the test instead of
blocking CI.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cm import data
from cm.runtime import checkpoints, distributed
from cm.setup import Setup
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per launch; the whole test takes well under a minute when healthy
OVERRIDES = {
    "training.n_iters": 4,
    "training.snapshot_every": 2,
    "training.batch_size": 8,  # 2 rows per device: 4 devices either way
    "data.random_flip": True,  # flips and noise must not depend on the process count
    "assignment.method": "linear",  # one pairing of the whole global batch, every process
    "assignment.scope": "global",   # (the CIFAR-10 configs' default, the paper's setting)
}

# Trains (or resumes) `run_dir`, as main.py would after its flags.
WORKER = textwrap.dedent("""
    import json, sys
    import jax
    from cm import train
    from cm.runtime import distributed
    from tests.helpers import tiny_config

    run_dir, stop_after, cfg = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    distributed.initialize(distributed.DistributedConfig(**cfg))
    jax.config.update("jax_threefry_partitionable", True)
    train.train(tiny_config(**json.loads(sys.argv[4])), run_dir,
                stop_after=stop_after if stop_after > 0 else None)
    print("devices", jax.process_index(), jax.process_count(), jax.device_count())
""")

CONFIG_FILE = textwrap.dedent("""
    from tests.helpers import tiny_config

    def get_config():
        return tiny_config(**{overrides!r})
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        # -O0 code generation: compiles ~2x faster, the same in every process.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                  "--xla_backend_optimization_level=0",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        # No persistent compilation cache: only process 0 writes it, and device ids
        # are in its keys, so process 0 would load programs that process 1 compiles,
        # and the skew can outlast gloo's 30 s rendezvous at the next collective.
        JAX_ENABLE_COMPILATION_CACHE="false",
        PYTHONUNBUFFERED="1",
    )


def launch(commands: list[list[str]], devices: int, timeout: float = TIMEOUT_S,
           ) -> list[subprocess.CompletedProcess]:
    """Runs the commands side by side; kills all of them if any outlives `timeout`."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for c, p in zip(commands, procs, strict=True):
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "\n---\n".join((p.communicate()[1] or "")[-2000:] for p in procs)
        pytest.fail(f"processes still running after {timeout}s (a hang?):\n{tails}")
    return results


def worker(run_dir: str, stop_after: int = 0, **dist) -> list[str]:
    return [sys.executable, "-c", WORKER, run_dir, str(stop_after), json.dumps(dist),
            json.dumps(OVERRIDES)]


def check_ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, f"exit {r.returncode}:\n{r.stderr[-4000:]}"


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_state(run_dir: str, step: int | None = None):
    ckpt = checkpoints.Checkpointer(run_dir)
    state = ckpt.restore(Setup(tiny_config(**OVERRIDES)).abstract_state(), step)
    ckpt.close()
    return jax.device_get(state)


def test_two_processes_match_one_and_resume(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # One process with 4 devices, uninterrupted.
    check_ok(launch([worker(one, mode="off")], devices=4))

    # Two processes with 2 devices each, interrupted after step 2 ...
    port = free_port()
    dist = dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2, timeout_s=60)
    results = launch([worker(two, 2, process_id=i, **dist) for i in range(2)], devices=2)
    check_ok(results)
    assert "devices 1 2 4" in results[1].stdout
    assert checkpoints.Checkpointer(two).latest_step() == 2

    # ... and resumed through main.py's flags to the end.
    config_path = tmp_path / "two_procs_config.py"
    config_path.write_text(CONFIG_FILE.format(overrides=OVERRIDES))
    port = free_port()
    check_ok(launch([[sys.executable, "main.py", "--config", str(config_path), "--workdir", two,
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      f"--process_id={i}", "--initialization_timeout=60"]
                     for i in range(2)], devices=2))

    ref, got = metrics(one), metrics(two)
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # process 0 alone wrote them, once
    # Every process pairs the same global batch (scope=global); its mean distances are
    # averaged over hosts ("reduction", a ratio, is the mean of the hosts' ratios).
    keys = ["loss", "distance", "grad_norm"] + [
        k for k in ("distance_before", "distance_after") if k in ref[0]]
    for key in keys:
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5,
                                   atol=1e-7, err_msg=key)
    a, b = saved_state(one), saved_state(two)
    assert int(b.step) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # The resumed steps moved the parameters (tiny_config's warmup gives step 1 lr 0
    # only), so the comparison above can see a wrong update after the resume.
    mid = saved_state(two, step=2)
    moved = max(float(np.abs(x - y).max()) for x, y in zip(
        jax.tree.leaves(b.params), jax.tree.leaves(mid.params), strict=True))
    assert moved > 1e-4, moved
    assert sorted(os.listdir(os.path.join(two, "samples"))) == [
        "step_00000002.png", "step_00000004.png"]
    logs = [f for f in os.listdir(two) if f.startswith("log.") and ".INFO." in f]
    assert len(logs) == 1, logs  # main.py: only process 0 writes a log file


@pytest.mark.parametrize("global_batch", [8, 24, 40, 48])
def test_batches_do_not_depend_on_the_process_count(global_batch):
    """Images, flips and noise of a global batch are the same whether 1, 2, 4 or 8
    processes share it, including host slices that start inside a noise block."""
    images = data.load_digits(8)
    whole = data.Batcher(images, global_batch, seed=3).batch(7)
    for count in (2, 4, 8):
        if global_batch % count:
            continue
        parts = [data.Batcher(images, global_batch, 3, p, count).batch(7) for p in range(count)]
        for key in ("x", "z"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), whole[key])
    # The flips compared above happen: some rows, not all, are mirrored left-right.
    plain = data.Batcher(images, global_batch, seed=3, random_flip=False).batch(7)["x"]
    flip = data.Batcher(images, global_batch, seed=3).flips(7)
    assert 0 < flip.sum() < global_batch, flip
    np.testing.assert_array_equal(whole["x"][flip], plain[flip][:, :, ::-1])  # [B, H, W, C]
    np.testing.assert_array_equal(whole["x"][~flip], plain[~flip])
    z = whole["z"]
    assert z.dtype == np.float32 and abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    assert not np.array_equal(z, data.Batcher(images, global_batch, seed=3).batch(8)["z"])
    g = data.NOISE_BLOCK
    if global_batch >= 2 * g:  # every block has its own stream
        assert not np.allclose(z[:g], z[g:2 * g])


def test_missing_process_fails_within_timeout(tmp_path):
    """num_processes=2 with one process started, and a coordinator nobody runs: both
    give up after --initialization_timeout (4 s) with a message that says what to check."""
    port, dead_port = free_port(), free_port()
    common = [sys.executable, "main.py", "--config", "configs/quickstart.py:smoke",
              "--num_processes=2", "--initialization_timeout=4"]
    t0 = time.monotonic()
    alone, orphan = launch([
        common + ["--workdir", str(tmp_path / "a"), "--process_id=0",
                  f"--coordinator_address=127.0.0.1:{port}"],
        common + ["--workdir", str(tmp_path / "b"), "--process_id=1",
                  f"--coordinator_address=127.0.0.1:{dead_port}"],
    ], devices=1, timeout=90)
    elapsed = time.monotonic() - t0
    assert alone.returncode == orphan.returncode == distributed.EXIT_TIMEOUT
    assert "timed out after 4s" in alone.stderr
    assert "not all 2 processes connected" in alone.stderr
    assert "cannot be reached" in orphan.stderr
    assert "Traceback" not in alone.stderr + orphan.stderr
    assert elapsed < 60, elapsed
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("flags, message", [
    (dict(num_processes=2, process_id=2), "must be below"),
    (dict(coordinator_address="nohost", num_processes=1, process_id=0), "host:port"),
    (dict(num_processes=0), ">= 1"),
    (dict(mode="sometimes"), "must be one of"),
])
def test_bad_distributed_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        distributed.DistributedConfig(**flags)


def test_cluster_detection_from_environment():
    detect = distributed.cluster_in_environment
    assert detect({}) is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    assert detect(slurm) == "slurm"
    assert detect({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert detect({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://x:1", "OMPI_COMM_WORLD_SIZE": "4"})
    assert detect({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "cloud-tpu"
    assert detect({"TPU_WORKER_HOSTNAMES": "w0"}) is None
    assert detect({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "JAX_COORDINATOR_ADDRESS"
    assert not distributed.initialize(distributed.DistributedConfig(mode="off"))
    if detect() is None:  # not itself inside a cluster job
        assert not distributed.initialize(distributed.DistributedConfig(mode="auto"))


def _paired_rows(scope: str, method: str, processes: int, steps: int = 3) -> list[np.ndarray]:
    """The noise each step's global batch trains with, assembled from every (simulated)
    process's rows: the pairing stage of each process, in process order."""
    from cm import config as config_lib
    from cm import pairing

    a = config_lib.build(tiny_config(**{"assignment.method": method,
                                        "assignment.scope": scope})).assignment
    images = data.load_digits(8)
    out = [[] for _ in range(steps)]
    for p in range(processes):
        batcher = data.Batcher(images, 16, 3, p, processes, random_flip=True)
        stage = pairing.Pairing(a, 3, 4 // processes, p, processes)
        with stage.inputs(batcher, 0, place=lambda arrays: arrays) as items:
            for step in range(steps):
                out[step].append(next(items)["batch"]["z"])
    return [np.concatenate(rows) for rows in out]


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_global_scope_pairs_the_same_way_on_any_process_layout(method):
    """scope=global: 2 processes x 2 devices take exactly the rows 1 process x 4 devices
    trains with (each process pairs the whole global batch and keeps its rows; knn draws
    as process 0), and they differ from scope=device's (four problems of 4 rows)."""
    one = _paired_rows("global", method, 1)
    two = _paired_rows("global", method, 2)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)
    if method == "linear":
        device = _paired_rows("device", method, 1)
        assert all(not np.array_equal(a, d) for a, d in zip(one, device, strict=True))
        host = _paired_rows("host", method, 2)  # each host its half: not the global pairing
        assert any(not np.array_equal(a, h) for a, h in zip(one, host, strict=True))
