"""Metric sinks: a log line, `metrics.jsonl` and TensorBoard event files."""

import json
import logging as logging_std
import math
import os
import time

from absl import logging


class _DropLibraryChatter(logging_std.Filter):
    """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        noisy = "orbax" in record.pathname or "tensorflow_datasets" in record.pathname
        return not (noisy and record.levelno < logging_std.WARNING)


def quiet_libraries() -> None:
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropLibraryChatter) for f in handler.filters):
        handler.addFilter(_DropLibraryChatter())


class MetricWriter:
    """Writes one record per log step; only the main process should create one."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # pragma: no cover - optional dependency
                logging.warning("tensorboardX not installed: no TensorBoard events")

    def _truncate_after(self, step: int) -> None:
        """Drops records past `step`: a resumed run logs those steps again."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip()]
        records = [_parse(r) for r in rows]
        torn = bool(rows) and records[-1] is None  # a crash in the middle of writing it
        if torn:
            logging.warning("dropping a torn last line of %s: %r", self.path, rows[-1][:200])
            rows, records = rows[:-1], records[:-1]
        for i, record in enumerate(records):
            if record is None:
                raise ValueError(f"{self.path}: line {i + 1} is not a JSON record: "
                                 f"{rows[i][:200]!r}; fix or remove it")
        keep = [r if r.endswith("\n") else r + "\n"
                for r, rec in zip(rows, records, strict=True) if rec.get("step", 0) <= step]
        if torn or keep != rows:
            with open(self.path, "w") as f:
                f.writelines(keep)

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step)}
        record.update({k: (float(v) if isinstance(v, float | int) or hasattr(v, "item")
                           else v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Meter:
    """The logging window of the training loop: rates, input waits and time left.

    `add(diagnostics)` once per step with that step's assignment diagnostics;
    `read(step, waited_seconds)` at a log step returns the window's figures and starts
    the next window (big_vision's `Chrono`, reduced to what the trainer logs).
    """

    def __init__(self, start_step: int, total_steps: int, global_batch: int,
                 clock=time.perf_counter):
        self.total_steps, self.global_batch, self._clock = total_steps, global_batch, clock
        self._start_step, self._start = start_step, clock()
        self._diagnostics: dict[str, list[float]] = {}

    def add(self, diagnostics: dict[str, float]) -> None:
        for k, v in diagnostics.items():
            self._diagnostics.setdefault(k, []).append(float(v))

    def read(self, step: int, waited_seconds: float) -> tuple[dict[str, float], dict[str, float]]:
        """(rates, diagnostic means) of the window ending at `step`; starts a new window.

        Rates: `steps_per_sec`, `images_per_sec`, `input_wait_fraction` (the share of
        the window's wall time spent waiting for input) and `seconds_left` at this rate.
        """
        now = self._clock()
        wall = max(now - self._start, 1e-9)
        steps_per_sec = (step - self._start_step) / wall
        rates = {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self.global_batch,
            "input_wait_fraction": waited_seconds / wall,
            "seconds_left": (self.total_steps - step) / max(steps_per_sec, 1e-9),
        }
        means = {k: sum(v) / len(v) for k, v in self._diagnostics.items()}
        self._start_step, self._start, self._diagnostics = step, now, {}
        return rates, means


def log_startup(clock, seconds: float) -> None:
    """The line that says what start-up cost, after the first step is done: `seconds`
    since the start, and the compile time and persistent-cache hits of `clock`
    (`compile_cache.CompileClock`)."""
    c = clock.read()
    logging.info("first step done %.1f s after start: compiling %.1f s (tracing %.1f s, "
                 "lowering %.1f s), persistent cache %d hits / %d misses", seconds,
                 c["compile_s"], c["trace_s"], c["lower_s"], c["cache_hits"],
                 c["cache_misses"])
