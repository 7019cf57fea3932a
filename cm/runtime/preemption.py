"""Stopping a run at a step boundary on SIGTERM or SIGINT, with a checkpoint.

Slurm, Kubernetes and TPU maintenance events announce a preemption with SIGTERM, a
user with Ctrl-C (SIGINT). `StopSignals` turns either into a request that the train
loop reads once per step: it finishes the step, writes a resume checkpoint at that
step and raises `Preempted`, which `main.py` turns into exit status 128 + signal.

With several processes the stop must happen at the same step everywhere (a checkpoint
is a collective), so SIGTERM is left to JAX's preemption service, which agrees on a
step across processes (`multihost_utils.reached_preemption_sync_point`); SIGINT is
passed on to it as a SIGTERM.
"""

import signal
import threading
from types import FrameType

import jax
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving a resume checkpoint at `step`."""

    def __init__(self, signum: int, step: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


class StopSignals:
    """Records SIGTERM / SIGINT while installed (a context manager); the loop polls it.

    A second signal of the same kind gets the handler that was there before (for
    SIGTERM: die at once; for SIGINT: KeyboardInterrupt), so an impatient user can
    still stop a run whose last step hangs.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._multi_process = jax.process_count() > 1
        self._unsynced = False  # several processes but no JAX preemption service

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        # Several processes: JAX's preemption service owns SIGTERM (see the module doc).
        for signum in (signal.SIGINT,) if self._multi_process else SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if self._multi_process:  # let JAX's preemption service agree on a step
            signal.raise_signal(signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Whether to stop after `step`: the same answer at the same step on every process.

        Call it once per step, on every process (with several processes it takes part
        in JAX's preemption protocol).
        """
        if self._multi_process:
            if self._unsynced:
                return False
            try:
                stop = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # jax_enable_preemption_service=False
                logging.warning("signals will not stop this run at a step boundary: %s", e)
                self._unsynced = True
                return False
            if stop and self.signum is None:
                self.signum = signal.SIGTERM
            return stop
        return self.signum is not None

    def stopped(self, step: int, checkpoint_dir: str) -> Preempted:
        """The exception to raise once the checkpoint of `step` is written; logs one line."""
        name = signal.Signals(self.signum).name
        message = (f"stopped by {name} after step {step}: checkpoint of step {step} written "
                   f"in {checkpoint_dir}; run the same command to continue")
        logging.warning("%s", message)
        return Preempted(self.signum, step, message)
