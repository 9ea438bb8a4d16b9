"""The simulated llama-server's /metrics text."""

from __future__ import annotations


import pytest
from twisted.internet.task import Clock

from tests.simulator_support import MakeServer, metric
from tests.simulator_support import clock, server  # noqa: F401 - pytest fixtures


def test_metrics_are_prometheus_text_with_llamacpp_names(server: MakeServer, clock: Clock) -> None:
    """/metrics is text/plain Prometheus with llama-server's counter and gauge names."""
    client = server(prompt_tokens_per_second=100)
    exchange = client.post("/completion", {"prompt": "a b c", "n_predict": 3})
    clock.advance(5)
    exchange.pump()
    response = client.get("/metrics").response
    assert response.header("content-type") == "text/plain; version=0.0.4"
    text = response.body.decode()
    assert "# TYPE llamacpp:prompt_tokens_total counter" in text
    assert "# TYPE llamacpp:requests_deferred gauge" in text
    assert metric(client, "prompt_tokens_total") == 4
    assert metric(client, "prompt_seconds_total") == pytest.approx(0.04)
    assert metric(client, "prompt_tokens_seconds") == pytest.approx(100)
    assert metric(client, "tokens_predicted_total") == 3
    assert metric(client, "predicted_tokens_seconds") == pytest.approx(50)
    assert metric(client, "n_tokens_max") == 7
