"""Multi-host start-up (`jax.distributed.initialize()` from flags or the cluster
environment), the ('data',) mesh, and moving arrays between hosts and the mesh.

Call `initialize` before anything else touches JAX's devices. Explicit flags win;
otherwise JAX's own detection (Slurm, Open MPI, Cloud TPU pods, `JAX_COORDINATOR_ADDRESS`)
fills in the rest. A peer or coordinator that cannot be reached fails with
a clear message after the configured timeout instead of hanging.
"""

import dataclasses
import os
import socket
import sys
import threading

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODES = ("auto", "on", "off")
EXIT_TIMEOUT = 3  # exit status of a start-up that timed out
_JAX_TIMEOUT_MARGIN_S = 30


class DistributedInitError(RuntimeError):
    """The processes of a multi-host run could not find each other; the message says why."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How to join a multi-process run (the `--distributed` and coordinator flags).

    Attributes:
      mode: "auto": initialize if any field below is set or the environment is a
        multi-process cluster job (see `cluster_in_environment`); "on": always call
        `jax.distributed.initialize` (JAX detects the rest, e.g. on a TPU pod slice);
        "off": a single process, never initialize.
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: processes in the run.
      process_id: this process's index in [0, num_processes).
      timeout_s: seconds to wait for all processes to connect before failing.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--distributed must be one of {MODES}, got {self.mode!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"--initialization_timeout must be positive, got {self.timeout_s}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"--process_id must be >= 0, got {self.process_id}")
        if (self.num_processes is not None and self.process_id is not None
                and self.process_id >= self.num_processes):
            raise ValueError(f"--process_id={self.process_id} must be below "
                             f"--num_processes={self.num_processes}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError("--coordinator_address must be host:port, got "
                             f"{self.coordinator_address!r}")

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                           self.process_id))


def cluster_in_environment(environ: dict[str, str] | None = None) -> str | None:
    """Names the multi-process launcher this process runs under, or None.

    Recognises the environments JAX auto-detects: a Slurm job step with several tasks
    (`srun`), Open MPI with several ranks (`mpirun`), a multi-host Cloud TPU slice
    that exports its worker list, and `JAX_COORDINATOR_ADDRESS`. A TPU VM that does
    not export its workers needs `--distributed=on`.
    """
    env = os.environ if environ is None else environ
    get = lambda k: env.get(k, "")
    as_int = lambda k: int(get(k)) if get(k).isdigit() else 0
    if get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(get(k) for k in slurm) and as_int("SLURM_NTASKS") > 1:
        return "slurm"
    if get("OMPI_MCA_orte_hnp_uri") and as_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "open-mpi"
    if get("MEGASCALE_COORDINATOR_ADDRESS") or "," in get("TPU_WORKER_HOSTNAMES"):
        return "cloud-tpu"
    return None


def initialize(cfg: DistributedConfig) -> bool:
    """Joins the multi-process run described by `cfg` and the environment, if any.

    Must run before anything queries JAX's devices. Returns whether
    `jax.distributed.initialize` was called.

    If the processes have not all connected after `cfg.timeout_s` seconds (a wrong
    `--num_processes`, a process that did not start, an unreachable coordinator), the
    process prints why to stderr and exits with status `EXIT_TIMEOUT`: JAX itself
    would abort with a stack trace that blames "another task", and its C++ wait cannot
    be interrupted from Python.

    Raises:
      DistributedInitError: JAX rejected the arguments, or the environment gave too
        little to start from (e.g. `--distributed=on` outside any cluster).
    """
    if cfg.mode == "off":
        return False
    source = "flags" if cfg.explicit else cluster_in_environment()
    if cfg.mode == "auto" and source is None:
        return False
    where = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "<auto>"
    done = threading.Event()
    watchdog = threading.Thread(target=_watchdog, args=(cfg, where, done), daemon=True,
                                name="distributed-init-watchdog")
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            # JAX's own deadline comes later, so that the watchdog's message wins.
            initialization_timeout=cfg.timeout_s + _JAX_TIMEOUT_MARGIN_S,
        )
    except (RuntimeError, ValueError, TypeError) as e:
        if "should only be called once" in str(e):
            return True  # a test or notebook that initialized already
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise DistributedInitError(
            f"jax.distributed.initialize failed ({source or 'JAX auto-detection'}; "
            f"coordinator {where}): {first}. Pass --coordinator_address, --num_processes "
            "and --process_id, or --distributed=off for a single process.") from e
    finally:
        done.set()
    logging.info("joined a run of %d processes as process %d (coordinator %s, via %s)",
                 jax.process_count(), jax.process_index(), where, source or "auto-detection")
    return True


def _reachable(address: str) -> str | None:
    """None if a TCP connection to host:port opens, else why not."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return None
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__


def _watchdog(cfg: DistributedConfig, where: str, done: threading.Event) -> None:
    if done.wait(cfg.timeout_s):
        return
    n = cfg.num_processes or "<auto>"
    me = cfg.process_id if cfg.process_id is not None else "<auto>"
    why = f"not all {n} processes connected to the coordinator at {where}"
    if me != 0 and where != "<auto>":
        unreachable = _reachable(where)
        if unreachable is not None:
            why = f"the coordinator at {where} cannot be reached ({unreachable})"
    sys.stderr.write(
        f"error: multi-host start-up timed out after {cfg.timeout_s}s (--initialization_"
        f"timeout) in process {me} of {n}: {why}. Check that all processes were started "
        "with the same --coordinator_address (process 0's host:port, reachable from the "
        "others: firewall, proxy variables) and --num_processes, each with a distinct "
        "--process_id; use --distributed=off for a single-process run.\n")
    sys.stderr.flush()
    os._exit(EXIT_TIMEOUT)


def is_main() -> bool:
    """Whether this is process 0: the one that writes logs, metrics, samples, configs."""
    return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host sharded) array as numpy on every process.

    A collective when the array spans processes: every process must call it.
    """
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Averages host-side scalars (e.g. assignment diagnostics) over all processes.

    A collective when there are several processes: every process must call it, with
    the same keys.
    """
    if jax.process_count() == 1 or not values:
        return dict(values)
    from jax.experimental import multihost_utils

    keys = sorted(values)
    local = np.asarray([values[k] for k in keys], np.float64)  # [K]
    every = np.asarray(multihost_utils.process_allgather(local))  # [P, K]
    return {k: float(v) for k, v in zip(keys, every.mean(axis=0), strict=True)}


def replicate(tree, sharding):
    """Host arrays (the same on every process) as global arrays with `sharding`.

    Each process fills only its own devices (no collective), so this works with one
    process or many.
    """
    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)


def make_mesh(devices: list | None = None) -> Mesh:
    """The 1-D ('data',) mesh over `devices` (default: every device of every process).

    Devices are grouped by process (stable within a process), so that each process's
    devices hold one contiguous block of the global batch: the rows its `Batcher`
    slice and `shard_batch` put there.
    """
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: d.process_index)
    return Mesh(devices, ("data",))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's host batch onto the mesh, split along the batch axis.

    With several processes, each passes its own `[B_host, ...]` rows; the result is
    the global `[B_host * process_count, ...]` array, process p's rows at
    `[p * B_host, (p + 1) * B_host)` (the mesh groups devices by process).
    """
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
