"""The shared harness: interleaved rounds keep each configuration's fastest time."""

import pytest

import harness


def test_rounds_interleave_and_keep_the_fastest_time(capsys):
    times = {"a": iter([30.0, 10.0, 20.0]), "b": iter([5.0, 7.0, 6.0])}
    order = []

    def measure_one(config):
        order.append(config)
        return {"time_ms": next(times[config]), "peak_mb": 1.0}
    results = harness.measure_rounds(["a", "b"], measure_one, 3, describe=str)
    assert order == ["a", "b"] * 3  # every configuration once per round
    assert results == [{"time_ms": 10.0, "peak_mb": 1.0, "rounds": 3},
                       {"time_ms": 5.0, "peak_mb": 1.0, "rounds": 3}]
    assert "[2/2, round 3/3] b" in capsys.readouterr().out


def test_a_failed_first_round_is_replaced_and_zero_rounds_refused():
    replies = iter([{"error": "boom"}, {"time_ms": 4.0}])
    assert harness.measure_rounds(["a"], lambda _: next(replies), 2, describe=str) == [
        {"time_ms": 4.0, "rounds": 2}]
    with pytest.raises(harness.UsageError, match="--rounds must be >= 1, got 0"):
        harness.measure_rounds(["a"], lambda _: {}, 0, describe=str)
