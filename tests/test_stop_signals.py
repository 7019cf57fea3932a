"""StopSignals in-process: the first SIGINT is a stop request, a second one reaches the
handler that was there before (Python's KeyboardInterrupt), and leaving the context
puts the previous handlers back."""

import signal

import pytest

from cm.runtime import preemption


def test_first_sigint_requests_a_stop_and_a_second_one_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with preemption.StopSignals() as stop:
        assert not stop.should_stop(1)
        signal.raise_signal(signal.SIGINT)
        assert stop.should_stop(2) and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the impatient user's second Ctrl-C
            signal.raise_signal(signal.SIGINT)
        assert stop.stopped(2, "/w").exit_code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


def test_leaving_the_context_restores_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with preemption.StopSignals():
        assert all(signal.getsignal(s) is not before[s] for s in preemption.SIGNALS)
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before
