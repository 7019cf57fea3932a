"""JAX's persistent compilation cache, on by default, and how long compiling took.

A relaunch of the same config (a resume, a sweep's next seed, an evaluation) reuses the
compiled programs of the previous launch from `~/.cache/immiscible_cm/jax_cache`
instead of compiling the step, the initialiser and the samplers again.
`CompileClock` adds up JAX's own compile-time events, so the log can say how much of a
start-up was compiling and how much of it the cache saved.
"""

import collections
import os
import threading

import jax

DEFAULT_DIR = "~/.cache/immiscible_cm/jax_cache"
# Programs that compile faster than this are not worth a cache file.
MIN_COMPILE_SECONDS = 0.2
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_HITS = "/jax/compilation_cache/cache_hits"
_MISSES = "/jax/compilation_cache/cache_misses"


def enable(cache_dir: str | None) -> str | None:
    """Turns the persistent cache on in `cache_dir` (None or '' leaves it off).

    Returns:
      The absolute cache directory, or None when off.
    """
    if not cache_dir:
        return None
    path = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileClock:
    """Seconds spent tracing, lowering and compiling, and cache hits / misses, since it
    was made (JAX's monitoring events; listeners stay registered for the process)."""

    _lock = threading.Lock()
    _totals: collections.Counter = collections.Counter()
    _registered = False

    def __init__(self):
        cls = type(self)
        with cls._lock:
            if not cls._registered:
                jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
                jax.monitoring.register_event_listener(cls._on_event)
                cls._registered = True
            self._start = collections.Counter(cls._totals)

    @classmethod
    def _on_duration(cls, event: str, duration: float, **_) -> None:
        if event in (_TRACE, _LOWER, _BACKEND):
            with cls._lock:
                cls._totals[event] += duration

    @classmethod
    def _on_event(cls, event: str, **_) -> None:
        if event in (_HITS, _MISSES):
            with cls._lock:
                cls._totals[event] += 1

    def read(self) -> dict[str, float]:
        """{'trace_s', 'lower_s', 'compile_s', 'cache_hits', 'cache_misses'} since creation."""
        with self._lock:
            d = {k: self._totals[k] - self._start[k] for k in
                 (_TRACE, _LOWER, _BACKEND, _HITS, _MISSES)}
        return {"trace_s": d[_TRACE], "lower_s": d[_LOWER], "compile_s": d[_BACKEND],
                "cache_hits": d[_HITS], "cache_misses": d[_MISSES]}
