"""Tests of cm.data.Prefetcher: order, errors, shutdown, wait statistics."""

import threading
import time
import traceback

import numpy as np
import pytest

from cm.data import Prefetcher, PrefetchError
from cm.pairing import Options, make_batch_fn


def _batches(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = rng.uniform(-1, 1, (size, 4)).astype(np.float32)
        yield {"x": x, "z": rng.standard_normal(x.shape).astype(np.float32), "index": i}


def _pipeline_threads():
    return [t for t in threading.enumerate() if t.name.startswith("test-pipeline")]


def test_keeps_order_and_steps():
    rng = np.random.default_rng(1)

    def slow_fn(batch, step):
        time.sleep(rng.uniform(0, 0.004))  # Uneven work must not reorder batches.
        return {**batch, "step": step}

    with Prefetcher(
        _batches(30), slow_fn, prefetch=3, start_step=100, name="test-pipeline"
    ) as pipe:
        out = list(pipe)
    assert [b["index"] for b in out] == list(range(30))
    assert [b["step"] for b in out] == list(range(100, 130))
    assert not pipe.alive


def test_with_batch_fn_assigns_every_batch():
    fn = make_batch_fn(Options("linear", "device", 2))
    source = list(_batches(5))
    with Prefetcher(source, fn, name="test-pipeline") as pipe:
        for want, (got, stats) in zip(source, pipe, strict=True):
            assert got["index"] == want["index"] and got["x"] is want["x"]
            assert stats["reduction"] > 0  # Paired, not passed through.
            for shard in (slice(0, 4), slice(4, 8)):  # Within each shard, rows are only permuted.
                assert {r.tobytes() for r in got["z"][shard]} == {
                    r.tobytes() for r in want["z"][shard]}


def failing_fn(batch, step):
    if step == 3:
        raise ValueError("bad batch 3")
    return batch


def test_surfaces_the_exception_with_its_traceback():
    pipe = Prefetcher(_batches(10), failing_fn, name="test-pipeline")
    got = [next(pipe) for _ in range(3)]
    assert [b["index"] for b in got] == [0, 1, 2]
    with pytest.raises(PrefetchError, match="step 3") as info:
        next(pipe)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "bad batch 3"
    frames = [frame.name for frame in traceback.extract_tb(cause.__traceback__)]
    assert "failing_fn" in frames  # The original traceback, from the thread.
    with pytest.raises(PrefetchError):  # A failed pipeline stays failed.
        next(pipe)
    pipe.close()
    assert not pipe.alive


def test_source_errors_surface_too():
    def source():
        yield {"x": 0}
        raise KeyError("missing shard")

    with Prefetcher(source(), name="test-pipeline") as pipe:
        assert next(pipe) == {"x": 0}
        with pytest.raises(PrefetchError) as info:
            next(pipe)
        assert isinstance(info.value.__cause__, KeyError)


def test_close_stops_a_blocked_producer():
    def endless():
        i = 0
        while True:
            yield {"i": i}
            i += 1

    pipe = Prefetcher(endless(), prefetch=2, name="test-pipeline")
    assert next(pipe) == {"i": 0}
    time.sleep(0.05)  # The producer fills the queue and blocks on put.
    pipe.close()
    assert not pipe.alive
    with pytest.raises(StopIteration):
        next(pipe)
    pipe.close()  # Idempotent.


def test_interrupt_inside_with_block_shuts_down():
    with pytest.raises(KeyboardInterrupt):
        with Prefetcher(_batches(1000), name="test-pipeline") as pipe:
            for batch in pipe:
                if batch["index"] == 2:
                    raise KeyboardInterrupt
    assert not pipe.alive
    assert not _pipeline_threads()


def test_wait_statistics():
    def slow(batch, step):
        time.sleep(0.02)
        return batch

    with Prefetcher(_batches(8), slow, prefetch=1, name="test-pipeline") as pipe:
        list(pipe)
        starved = pipe.stats()
    assert starved.batches == 8
    assert starved.wait_fraction > 0.5  # The consumer did nothing but wait.
    assert starved.busy_seconds >= 8 * 0.02
    assert 0 <= starved.waited_seconds <= starved.wall_seconds

    with Prefetcher(_batches(6), prefetch=2, name="test-pipeline") as pipe:
        time.sleep(0.05)  # A slow consumer finds its input ready.
        pipe.stats()
        for _ in pipe:
            time.sleep(0.02)
        assert pipe.wait_fraction() < 0.3
        assert pipe.stats().batches == 0  # A new window.


def test_bad_prefetch():
    with pytest.raises(ValueError, match="prefetch"):
        Prefetcher([], prefetch=0)


def test_no_thread_left_behind():
    assert not _pipeline_threads()
