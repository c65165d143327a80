"""RateLimitedLog: one line per key per interval, counting what it held back, with bounded memory."""

from __future__ import annotations

import logging

import pytest

from mqtt_bridge.ratelimit import RateLimitedLog


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def logger():
    return logging.getLogger("tests.ratelimit")


@pytest.fixture
def log(logger, clock):
    return RateLimitedLog(logger, interval=60.0, clock=clock)


def lines(caplog):
    return [record.getMessage() for record in caplog.records if record.name == "tests.ratelimit"]


def test_first_line_per_key_is_logged_with_its_arguments(log, caplog):
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        assert log.warning("bad:s1", "dropped payload from %s: %s", "s1", "not_json") is True
    assert lines(caplog) == ["dropped payload from s1: not_json"]
    assert caplog.records[0].levelno == logging.WARNING


def test_repeats_within_the_interval_are_suppressed_then_counted(log, clock, caplog):
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        assert log.warning("k", "bad %s", "a")
        clock.now += 10
        assert not log.warning("k", "bad %s", "b")
        clock.now += 49.9
        assert not log.warning("k", "bad %s", "c")
        clock.now += 0.1  # 60 s after the line
        assert log.warning("k", "bad %s", "d")
    assert lines(caplog) == ["bad a", "bad d (2 more since the last line)"]


def test_suppressed_count_restarts_after_each_line(log, clock, caplog):
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        log.warning("k", "x")
        log.warning("k", "x")
        clock.now += 60
        log.warning("k", "x")
        clock.now += 60
        log.warning("k", "x")
    assert lines(caplog) == ["x", "x (1 more since the last line)", "x"]


def test_the_interval_runs_from_the_last_line_not_the_last_attempt(log, clock, caplog):
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        log.warning("k", "x")
        for _ in range(10):
            clock.now += 5
            log.warning("k", "x")
        clock.now += 10
        assert log.warning("k", "x")
    assert len(lines(caplog)) == 2


def test_keys_are_independent(log, caplog):
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        assert log.warning("bad:s1", "s1")
        assert log.warning("bad:s2", "s2")
        assert not log.warning("bad:s1", "s1")
    assert lines(caplog) == ["s1", "s2"]


def test_memory_is_bounded_and_the_oldest_key_is_forgotten_first(logger, clock, caplog):
    log = RateLimitedLog(logger, interval=60.0, max_keys=2, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        log.warning("a", "a")
        log.warning("b", "b")
        log.warning("c", "c")  # forgets "a"
        assert log.warning("a", "a again")  # forgotten: logged at once
        assert not log.warning("c", "c")  # still remembered
    assert lines(caplog) == ["a", "b", "c", "a again"]


def test_hostile_stream_of_new_keys_stays_within_max_keys(logger, clock):
    log = RateLimitedLog(logger, interval=60.0, max_keys=100, clock=clock)
    logger.disabled = True
    try:
        for index in range(1000):
            log.warning(f"bad:{index}", "x")
        assert not log.warning("bad:900", "x")  # among the last 100: remembered
        assert log.warning("bad:899", "x")  # older: forgotten
    finally:
        logger.disabled = False


def test_percent_signs_in_arguments_are_not_formatting(log, caplog):
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        log.warning("k", "device %s", "100%s")
    assert lines(caplog) == ["device 100%s"]


def test_a_key_logged_again_becomes_the_newest(logger, clock, caplog):
    log = RateLimitedLog(logger, interval=60.0, max_keys=2, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        log.warning("a", "a")
        log.warning("b", "b")
        clock.now += 60
        log.warning("a", "a")  # logged again: now the newest key
        log.warning("c", "c")  # forgets "b", the oldest
        assert not log.warning("a", "a")
        assert log.warning("b", "b")
    assert lines(caplog) == ["a", "b", "a", "c", "b"]
