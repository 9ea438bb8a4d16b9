"""Edge case: stopping the agent cancels its report; cancellation must not turn into a report."""

from __future__ import annotations

from .test_agent import World, logs  # noqa: F401  (fixture)


def test_stop_while_llamacpp_read_is_running_posts_no_report_after_stop(logs):  # noqa: F811
    """SIGTERM while the local read hangs: the cancelled read is not reported as 'unreachable'
    (no report is posted after stop, the host's state is untouched, no false log line)."""
    w = World()
    w.agent.startService()
    up = w.upstream
    assert up.state.value == "healthy"
    w.net.hanging.add("llama")
    w.clock.advance(1)  # the second tick's read hangs
    reports_before = sum(1 for _, m, p in w.balancer_calls() if p.endswith("/report"))
    stopped = []
    w.agent.stopService().addBoth(stopped.append)
    reports_after = sum(1 for _, m, p in w.balancer_calls() if p.endswith("/report"))
    assert reports_after == reports_before, "a report was posted after stopService"
    assert up.last_error is None and up.state.value == "healthy"
    assert not [line for line in logs if "unreachable" in line], logs
    assert stopped == [None]
    w.registry.stopService()
    assert w.clock.getDelayedCalls() == []


def test_stop_while_a_report_is_in_flight_is_not_a_balancer_failure(logs):  # noqa: F811
    """SIGTERM while a report POST is waiting: the cancelled POST is not logged as the
    balancer being unreachable, nor counted as a failure."""
    w = World()
    w.agent.startService()
    w.net.hanging.add("balancer")
    w.clock.advance(1)  # the second report hangs on the balancer
    w.agent.stopService()
    assert w.agent.failures == 0 and w.agent.balancer_state == "draining"
    assert not [line for line in logs if "unreachable" in line], logs
    w.clock.advance(w.config.drain_timeout + 10)  # the drain cannot reach the hanging balancer
    w.registry.stopService()
    assert w.clock.getDelayedCalls() == []
