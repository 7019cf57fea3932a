"""Checkpoints in the workdir: kept snapshots plus one frequent resume checkpoint.

Two orbax `CheckpointManager`s: `checkpoints/` keeps the last `keep` snapshots (the
ones evaluation reads), `resume/` keeps only the latest frequent checkpoint. Restoring
takes whichever of the two is newer, so the workdir is the resume key.

Multi-host: every process calls `save`, `restore` and `latest_step` (orbax syncs
them; process 0 writes the metadata, each array shard is written once), so the
workdir must be on a filesystem that all hosts share (NFS, Lustre, a Filestore or
GCS FUSE mount on TPU VMs).
"""

import os
from typing import Any

import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, snapshot_every: int = 0,
                 resume_every: int = 0):
        self.workdir = os.path.abspath(workdir)
        self.snapshot_every = snapshot_every
        self.resume_every = resume_every
        opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
        self.snapshots = ocp.CheckpointManager(os.path.join(self.workdir, "checkpoints"),
                                               options=opts(keep))
        self.resume = ocp.CheckpointManager(os.path.join(self.workdir, "resume"),
                                            options=opts(1))

    def snapshot_steps(self) -> list[int]:
        return sorted(self.snapshots.all_steps())

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
        """Restores `step` (default: the latest) onto the shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir}")
        return self._manager_for(step).restore(step, args=ocp.args.StandardRestore(
            abstract_state))

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

