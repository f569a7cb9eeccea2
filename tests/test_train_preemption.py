"""The stop decision after SIGTERM: per step for one process, agreed across processes."""

import os
import signal

import pytest

from derta_jax.train.preemption import StopFlag, any_process


def _no_reduce(flag):
    raise AssertionError("a single process must not synchronise")


def test_single_process_stops_at_the_next_step_without_syncing():
    stop = StopFlag(every=10, process_count=1, reduce=_no_reduce)
    assert not stop.should_stop(1)
    stop.requested = True
    assert stop.should_stop(2) and stop.stopped


def test_processes_agree_only_at_multiples_of_every():
    calls = []

    def reduce(flag):  # another process was signalled: the OR is true from step 6 on
        calls.append(flag)
        return len(calls) >= 2

    stop = StopFlag(every=3, process_count=2, reduce=reduce)
    decisions = [stop.should_stop(step) for step in range(1, 8)]
    assert decisions == [False, False, False, False, False, True, True]
    assert calls == [False, False]  # at steps 3 and 6 only; this process got no signal
    assert stop.reason() == "stop requested by another process"


def test_a_signal_between_agreements_waits_for_the_next_one():
    stop = StopFlag(every=4, process_count=2, reduce=lambda flag: flag)
    assert not stop.should_stop(1)
    stop.requested, stop.signal_name = True, "SIGTERM"
    assert [stop.should_stop(s) for s in (2, 3, 4)] == [False, False, True]
    assert stop.reason() == "SIGTERM received"


def test_handler_sets_the_flag_and_names_the_signal():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = StopFlag(every=1, process_count=1)
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_any_process_in_one_process_is_the_flag_and_every_is_checked():
    assert any_process(True) and not any_process(False)
    with pytest.raises(ValueError, match="every=0"):
        StopFlag(every=0)
