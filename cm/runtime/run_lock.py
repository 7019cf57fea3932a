"""One trainer per workdir: a lock file held for the run's life.

`<workdir>/lock` names its holder (host, process id, process start time, when it
started), as JSON. It is created atomically (`O_EXCL`), so of two trainers started on
one workdir exactly one gets it; the other is refused with one line naming the
holder. The holder removes it on any exit that unwinds Python (the end of the run, an
error, SIGTERM / SIGINT, `sys.exit`). A SIGKILL, an out-of-memory kill or a crashed host
leaves it behind: a trainer on the same host finds that process gone (or its id
reused by another program) and takes the lock over with a warning; a lock left by
another host cannot be checked from here, so the refusal says to delete the file once
that run is known to be over.

With several processes, process 0 holds the lock for all of them.
"""

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

LOCK_FILE = "lock"


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir; the message names it."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process_start: str  # the process's start time since boot (Linux), "" elsewhere
    started: str  # wall-clock time the lock was taken

    def describe(self) -> str:
        return f"process {self.pid} on host {self.host} (since {self.started})"


def _process_start(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot: tells a reused process id apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> Holder:
    pid = os.getpid()
    return Holder(socket.gethostname(), pid, _process_start(pid),
                  time.strftime("%Y-%m-%d %H:%M:%S"))


def _read(path: str) -> Holder | None:
    """The holder named in a lock file; None if there is no such file.

    A file that cannot be parsed (its writer died between creating and writing it)
    names a holder with pid 0 on this host, which `is_alive` calls gone.
    """
    try:
        with open(path) as f:
            return Holder(**json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return Holder(socket.gethostname(), 0, "", "?")


def read_holder(workdir: str) -> Holder | None:
    """The holder of `workdir`'s lock, or None."""
    return _read(os.path.join(workdir, LOCK_FILE))


def is_alive(holder: Holder) -> bool | None:
    """Whether the holder still runs; None when it is on another host (unknowable here)."""
    if holder.host != socket.gethostname():
        return None
    if holder.pid <= 0:
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    start = _process_start(holder.pid)
    return not (holder.process_start and start and start != holder.process_start)


def _refusal(workdir: str, holder: Holder, alive: bool | None) -> WorkdirLockedError:
    path = os.path.join(workdir, LOCK_FILE)
    if alive:
        why = "is still running: stop it first, or use another --workdir"
    else:
        why = (f"may still be running (another host: it cannot be checked from here); "
               f"if that run is over, delete {path}")
    return WorkdirLockedError(f"workdir {workdir} is locked by {holder.describe()}, which "
                              f"{why}")


def check_free(workdir: str) -> None:
    """Raises `WorkdirLockedError` if a live (or uncheckable) trainer holds `workdir`."""
    holder = read_holder(workdir)
    if holder is not None and (holder.host, holder.pid) != (socket.gethostname(), os.getpid()):
        alive = is_alive(holder)
        if alive is not False:
            raise _refusal(workdir, holder, alive)


def _try_create(path: str, me: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(me), f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: str, stale: Holder) -> None:
    """Removes the lock file if it still names `stale` (rename first: atomic)."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    if _read(aside) == stale:
        os.remove(aside)
        logging.warning("took over the lock of %s, which is gone", stale.describe())
    else:  # another trainer locked it meanwhile: put its lock back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.remove(aside)


def _age_seconds(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def acquire(workdir: str) -> Holder:
    """Takes the lock of `workdir` (which must exist) or raises `WorkdirLockedError`."""
    path = os.path.join(workdir, LOCK_FILE)
    me = this_process()
    for _ in range(50):
        if _try_create(path, me):
            return me
        holder = _read(path)
        if holder is None:
            continue  # released meanwhile
        if holder.pid == 0 and _age_seconds(path) < 5:  # being written right now
            time.sleep(0.1)
            continue
        alive = is_alive(holder)
        if alive is not False:
            raise _refusal(workdir, holder, alive)
        _take_over(path, holder)
    raise WorkdirLockedError(f"could not lock workdir {workdir}: other trainers keep "
                             "taking it; start one trainer per workdir")


def release(workdir: str, me: Holder) -> None:
    """Removes the lock if it is still `me`'s."""
    path = os.path.join(workdir, LOCK_FILE)
    if _read(path) == me:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, is_main: bool = True) -> Iterator[None]:
    """Holds the workdir's lock for the duration of the block (on the main process).

    With several processes, pass `is_main` for process 0; the others wait for its
    verdict, so that a refused run stops on every process.
    """
    me, error = None, None
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        try:
            me = acquire(workdir)
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if refused and error is None:
            error = WorkdirLockedError(f"workdir {workdir} is locked by another run (see "
                                       "the log of process 0)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if me is not None:
            release(workdir, me)
