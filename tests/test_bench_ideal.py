"""The ideal scheduler of the benchmarks (bench/ideal.py) on traces small enough to check by hand."""

from __future__ import annotations

import pytest

from bench.ideal import Request, Server, capacity, simulate


def test_one_slot_serves_in_arrival_order_and_the_second_request_waits() -> None:
    """One slot at 10 tokens/s, 100 prompt tokens/s: the second request waits for the first to end."""
    fleet = [Server(slots=1, tokens_per_second=10.0, prompt_tokens_per_second=100.0)]
    first, second = simulate(fleet, [Request(0.0, 10, 10), Request(0.5, 10, 5)])
    # prompt 0.1 s, first token 0.1 s later, last token 1.0 s after the prompt
    assert first.ttft == pytest.approx(0.2)
    assert first.e2e == pytest.approx(1.1)
    # starts at 1.1 when the slot frees: waited 0.6 s
    assert second.start == pytest.approx(1.1)
    assert second.ttft == pytest.approx(0.6 + 0.1 + 0.1)
    assert second.e2e == pytest.approx(0.6 + 0.1 + 0.5)


def test_a_free_fast_slot_is_preferred_and_a_slow_one_is_used_rather_than_waiting() -> None:
    """Two requests at once on a fast and a slow server: the first goes fast, the second slow at once."""
    fleet = [Server(1, 1.0, 1000.0), Server(1, 10.0, 1000.0)]
    a, b = simulate(fleet, [Request(0.0, 0, 10), Request(0.0, 0, 10)])
    assert (a.server, a.ttft, a.e2e) == (1, pytest.approx(0.1), pytest.approx(1.0))
    assert (b.server, b.ttft, b.e2e) == (0, pytest.approx(1.0), pytest.approx(10.0))


def test_fifo_order_is_kept_even_when_input_is_not_sorted() -> None:
    """Outcomes come back in input order; scheduling follows arrival time."""
    fleet = [Server(1, 10.0, 100.0)]
    late, early = simulate(fleet, [Request(0.05, 0, 10), Request(0.0, 0, 10)])
    assert early.start == 0.0
    assert late.start == pytest.approx(1.0)


def test_capacity_adds_up_every_slot() -> None:
    """Capacity is the sum over slots of 1 / mean service time."""
    fleet = [Server(2, 10.0, 100.0), Server(1, 5.0, 100.0)]
    # service: 10/100 + 20/10 = 2.1 s on the fast, 0.1 + 4 = 4.1 s on the slow
    assert capacity(fleet, 10, 20) == pytest.approx(2 / 2.1 + 1 / 4.1)


def test_a_fleet_without_slots_is_refused() -> None:
    """No slot anywhere is a usage error, not an endless wait."""
    with pytest.raises(ValueError):
        simulate([Server(0, 10.0)], [Request(0.0, 1, 1)])
