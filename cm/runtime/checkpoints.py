"""Checkpoints in the workdir: kept snapshots plus one frequent resume checkpoint.

Two orbax `CheckpointManager`s: `checkpoints/` keeps the last `keep` snapshots (the
ones evaluation reads), `resume/` keeps the latest two frequent checkpoints (the older
one is there to fall back to when the newest already holds diverging parameters).
Restoring takes whichever of the two is newer, so the workdir is the resume key.

A checkpoint that cannot be restored (a truncated or missing file) is reported by name
and the next newest one is restored instead; training moves the damaged ones aside, to
`damaged/`, so that the run can write those steps again.

Multi-host: every process calls `save`, `restore` and `latest_step` (orbax syncs
them; process 0 writes the metadata, each array shard is written once), so the
workdir must be on a filesystem that all hosts share (NFS, Lustre, a Filestore or
GCS FUSE mount on TPU VMs).
"""

import logging as pylogging
import os
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

PyTree = Any
DAMAGED_DIR = "damaged"
RESUME_KEEP = 2  # frequent checkpoints kept: the newest may already be diverging

# Each replicated array is written by its first replica (orbax's replica_id 0), not split
# across all replicas (orbax's default "replica-parallel" save): that split costs one eager
# slice per array and device, thousands per save of the train state on 8 devices (on 8
# simulated CPU devices 5 s per save against 1.2 s without it), to parallelise host copies
# that take milliseconds. What is written, and so restoring, is the same either way.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir could be restored; the message says why."""


def _ignore_closed_event_loop_noise() -> None:
    """Silences the echo of a failed restore.

    Tensorstore reads still in flight when a restore fails report back later to
    orbax's event loop, which is closed by then; each prints 'Exception ignored ...
    RuntimeError: Event loop is closed', hundreds of lines that bury the real error (which
    has been reported already). Only that exact error is dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loop", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_event_loop = True
    sys.unraisablehook = hook

    # The same echo by other routes: the error printed from tensorstore's callback thread
    # (sys.excepthook), and asyncio's 'Future exception was never retrieved' for the failed
    # reads, logged when the futures are collected (often at exit, after the real error).
    previous_excepthook = sys.excepthook

    def excepthook(kind, error, tb):
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous_excepthook(kind, error, tb)

    sys.excepthook = excepthook
    pylogging.getLogger("asyncio").addFilter(_drop_unretrieved_read_errors)


def _drop_unretrieved_read_errors(record: pylogging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith(("Future exception was never retrieved",
                                    "Task exception was never retrieved"))
                and ("tensorstore_spec" in message or "async_deserialize" in message))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


SUBDIRS = ("checkpoints", "resume")  # the snapshots' and the resume checkpoints' folders


def listed_steps(workdir: str) -> list[int]:
    """The steps with a finished checkpoint in `workdir`, read off the folder names only.

    What `Checkpointer.all_steps` lists (orbax names a finished step's folder by the step
    alone; one being written carries a temporary suffix), without creating a manager or
    any folder: for checks that must run before anything is written in the workdir.
    """
    steps = set()
    for sub in SUBDIRS:
        folder = os.path.join(workdir, sub)
        if os.path.isdir(folder):
            steps.update(int(name) for name in os.listdir(folder)
                         if name.isdigit() and os.path.isdir(os.path.join(folder, name)))
    return sorted(steps)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, snapshot_every: int = 0,
                 resume_every: int = 0):
        self.workdir = os.path.abspath(workdir)
        self.snapshot_every = snapshot_every
        self.resume_every = resume_every
        opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
        self.snapshots = ocp.CheckpointManager(os.path.join(self.workdir, SUBDIRS[0]),
                                               options=opts(keep))
        self.resume = ocp.CheckpointManager(os.path.join(self.workdir, SUBDIRS[1]),
                                            options=opts(RESUME_KEEP))

    def snapshot_steps(self) -> list[int]:
        return sorted(self.snapshots.all_steps())

    def all_steps(self) -> list[int]:
        """Every step with a checkpoint, snapshot or resume."""
        return sorted(set(self.snapshots.all_steps()) | set(self.resume.all_steps()))

    def reload(self) -> None:
        """Lists the checkpoints again (another process, e.g. training, may have changed
        them)."""
        self.snapshots.reload()
        self.resume.reload()

    def latest_step(self) -> int | None:
        steps = [s for s in (self.snapshots.latest_step(), self.resume.latest_step())
                 if s is not None]
        return max(steps) if steps else None

    def _manager_for(self, step: int) -> ocp.CheckpointManager:
        if step in self.snapshots.all_steps():
            return self.snapshots
        if step in self.resume.all_steps():
            return self.resume
        raise FileNotFoundError(
            f"no checkpoint at step {step} in {self.workdir}; snapshots: "
            f"{self.snapshot_steps()}, resume: {sorted(self.resume.all_steps())}")

    def restore(self, abstract_state: PyTree, step: int | None = None) -> PyTree:
        """Restores `step` (default: the newest restorable one) onto `abstract_state`'s
        shardings."""
        if step is None:
            step, state = self.restore_newest(abstract_state)
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.workdir}")
            return state
        return self._manager_for(step).restore(step, args=ocp.args.StandardRestore(
            abstract_state))

    def _newest_first(self) -> list[tuple[int, ocp.CheckpointManager]]:
        steps = [(s, self.resume) for s in self.resume.all_steps()]
        steps += [(s, self.snapshots) for s in self.snapshots.all_steps()]
        return sorted(steps, key=lambda sm: (sm[0], sm[1] is self.snapshots), reverse=True)

    def restore_newest(self, abstract_state: PyTree, set_aside: bool = False,
                       ) -> tuple[int | None, PyTree | None]:
        """The newest checkpoint that restores, snapshot or resume: (step, state).

        A checkpoint that fails to restore is named in a warning with its error, and the
        next newest is tried.

        Args:
          abstract_state: the state's shapes, dtypes and shardings.
          set_aside: move the damaged checkpoints newer than the restored one to
            `<workdir>/damaged/` (training does, so that it can save those steps again).

        Returns:
          (None, None) if there is no checkpoint at all.

        Raises:
          CheckpointError: there are checkpoints but none of them restores.
        """
        damaged = []
        # Before the first try: a failed read can echo before its exception reaches us.
        _ignore_closed_event_loop_noise()
        for step, manager in self._newest_first():
            path = os.path.join(str(manager.directory), str(step))
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:  # noqa: BLE001 - any failure: try the next newest
                logging.warning("checkpoint %s cannot be restored (%s); trying the next "
                                "newest", path, _first_line(e))
                damaged.append((path, e))
                continue
            if damaged:
                logging.warning("restored step %d from %s instead", step, path)
                if set_aside:
                    self._set_aside([p for p, _ in damaged])
            return step, state
        if damaged:
            raise CheckpointError(
                f"none of the {len(damaged)} checkpoints in {self.workdir} can be restored: "
                + "; ".join(f"{p}: {_first_line(e)}" for p, e in damaged)
                + ". Move them aside to start again, or use a new --workdir.")
        return None, None

    def _set_aside(self, paths: list[str]) -> None:
        """Moves damaged step folders to `<workdir>/damaged/` (process 0; all wait)."""
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, DAMAGED_DIR)
            os.makedirs(target, exist_ok=True)
            for path in paths:
                kind, step = os.path.split(path)
                dest = os.path.join(target, f"{os.path.basename(kind)}-{step}-"
                                            f"{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(path, dest)
                logging.warning("moved the damaged checkpoint %s to %s", path, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints_set_aside")
        self.reload()

    def save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Saves on the configured triggers (or always with `force`); returns whether it did."""
        saved = False
        if force or (self.snapshot_every and step % self.snapshot_every == 0):
            if step not in self.snapshots.all_steps():
                self.snapshots.save(step, args=ocp.args.StandardSave(state), force=True)
                saved = True
        elif self.resume_every and step % self.resume_every == 0:
            self.resume.save(step, args=ocp.args.StandardSave(state), force=True)
            saved = True
        return saved

    def save_resume(self, step: int, state: PyTree) -> None:
        """Saves `step` as a resume checkpoint now, unless a checkpoint of it exists."""
        if step not in self.snapshots.all_steps() and step not in self.resume.all_steps():
            self.resume.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        self.snapshots.wait_until_finished()
        self.resume.wait_until_finished()

    def close(self) -> None:
        self.snapshots.close()
        self.resume.close()

