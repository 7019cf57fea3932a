"""A generic prefetcher: a background thread that prepares items ahead of the consumer.

`Prefetcher(items, fn, prefetch=2)` pulls items from an iterator, applies
`fn(item, step)` (e.g. the noise pairing of `cm.pairing`) in a daemon thread and
queues up to `prefetch` results ahead, in order. The training step then overlaps with
the preparation of the next batches, and `stats()` tells how long the consumer waited.
"""

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

Batch = Mapping[str, Any]
_POLL_SECONDS = 0.05  # How often blocked puts and gets look at the stop event.


class PrefetchError(RuntimeError):
    """A batch failed inside the prefetch thread; `__cause__` is the original error."""


@dataclasses.dataclass(frozen=True)
class PrefetchStats:
    """Counters of one window (since the previous `Prefetcher.stats` call).

    Attributes:
        waited_seconds: time the consumer spent blocked in `next()`.
        wall_seconds: wall time of the window.
        batches: batches delivered in the window.
        busy_seconds: time the thread spent producing those batches (source + fn).
    """

    waited_seconds: float
    wall_seconds: float
    batches: int
    busy_seconds: float

    @property
    def wait_fraction(self) -> float:
        """Fraction of the window's wall time that the consumer waited for input."""
        return self.waited_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class _Failure:
    step: int
    error: BaseException


_DONE = object()


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    # Bounded put that gives up once `stop` is set, so the thread never hangs.
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _work(
    source: Iterator[Batch],
    fn: Callable[[Batch, int], Batch] | None,
    step: int,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    # A plain function (no reference to the Prefetcher), so that an abandoned
    # Prefetcher can still be garbage collected and stop its thread.
    try:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                _put(out, stop, _DONE)
                return
            if fn is not None:
                batch = fn(batch, step)
            if not _put(out, stop, (batch, time.perf_counter() - start)):
                return
            step += 1
    except BaseException as error:  # noqa: BLE001 - everything goes to the consumer.
        _put(out, stop, _Failure(step, error))


class Prefetcher(Iterator[dict[str, Any]]):
    """Runs `fn(batch, step)` on the batches of `source` in a background thread.

    Order is kept, at most `prefetch` results wait in the queue. An exception raised
    by the source or by `fn` is raised in the consumer by its next `next()`, as a
    `PrefetchError` whose cause is the original exception (with its traceback); the
    prefetcher is then closed. `close()` (or leaving a `with` block, also on Ctrl-C)
    stops the daemon thread; every blocking call polls a stop event, so nothing
    deadlocks.

    Args:
        source: iterable of batches (dicts).
        fn: per-item function `fn(item, step) -> result` (e.g. `cm.pairing`'s
            pairing and placement); None passes items through (prefetch only).
        prefetch: results queued ahead of the consumer, at least 1.
        start_step: step number of the first batch (the resume step).
        name: the thread's name.

    Example:
        >>> from cm.data.prefetch import Prefetcher
        >>> batches = ({"x": i} for i in range(3))
        >>> with Prefetcher(batches, lambda b, step: {**b, "step": step}) as pipe:
        ...     print([b["step"] for b in pipe])
        [0, 1, 2]
    """

    def __init__(
        self,
        source: Iterable[Batch],
        fn: Callable[[Batch, int], Batch] | None = None,
        *,
        prefetch: int = 2,
        start_step: int = 0,
        name: str = "prefetch",
    ):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1, got {prefetch!r}")
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._error: PrefetchError | None = None
        self._done = False
        self._window_start = time.perf_counter()
        self._waited = 0.0
        self._busy = 0.0
        self._batches = 0
        self._thread = threading.Thread(
            target=_work,
            args=(iter(source), fn, start_step, self._queue, self._stop),
            name=name,
            daemon=True,
        )
        self._thread.start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        if self._done or self._stop.is_set():  # Finished, or closed by the consumer.
            raise StopIteration
        start = time.perf_counter()
        try:
            item = self._get()
        finally:
            self._waited += time.perf_counter() - start
        if item is _DONE:
            self._done = True
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self._error = PrefetchError(
                f"the batch of step {item.step} failed in the prefetch thread: {item.error!r}"
            )
            self.close()
            raise self._error from item.error
        batch, busy = item
        self._busy += busy
        self._batches += 1
        return batch

    def _get(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self._stop.is_set():
                    self._done = True
                    raise StopIteration from None
                if not self._thread.is_alive() and self._queue.empty():
                    raise PrefetchError("the prefetch thread ended without a result") from None

    def stats(self) -> PrefetchStats:
        """Counters since the previous call (or the start), and starts a new window."""
        now = time.perf_counter()
        result = PrefetchStats(
            waited_seconds=self._waited,
            wall_seconds=now - self._window_start,
            batches=self._batches,
            busy_seconds=self._busy,
        )
        self._window_start, self._waited, self._busy, self._batches = now, 0.0, 0.0, 0
        return result

    def wait_fraction(self) -> float:
        """`stats().wait_fraction`: waited / wall time since the previous call."""
        return self.stats().wait_fraction

    @property
    def alive(self) -> bool:
        """Whether the background thread is still running."""
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread and waits up to `timeout` seconds for it to end.

        Idempotent. A batch the thread is computing is finished first (a Python
        thread cannot be interrupted); the daemon thread never blocks interpreter
        exit.
        """
        self._stop.set()
        self._drain()  # A blocked put returns at once.
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._drain()  # Drops the batches put meanwhile.

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
