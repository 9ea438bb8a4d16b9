"""llama-server's Prometheus text for ``/metrics`` (the new build's names).

``llamacpp:prompt_tokens_total`` counts only the prompt tokens a server
evaluated; the ones it reused from its prompt cache go to
``llamacpp:prompt_tokens_cached_total``.
"""

from __future__ import annotations

from paddler.simulator.engine import SimulatedServerEngine


def _metric_value(value: float) -> str:
    return f"{value:.6g}"


def render_metrics(engine: SimulatedServerEngine) -> str:
    """llama-server's Prometheus text for /metrics (the new build's names)."""
    m = engine.metrics
    prompt_rate = m.prompt_tokens_total / m.prompt_seconds_total if m.prompt_seconds_total else 0
    predicted_rate = (
        m.tokens_predicted_total / m.tokens_predicted_seconds_total
        if m.tokens_predicted_seconds_total else 0
    )
    busy = m.n_busy_slots_total / m.n_decode_total if m.n_decode_total else 0
    rows: list[tuple[str, str, str, float]] = [
        ("prompt_tokens_total", "counter",
         "Number of prompt tokens processed, excluding cached tokens", m.prompt_tokens_total),
        ("prompt_tokens_cached_total", "counter",
         "Number of prompt tokens reused from the cache", m.prompt_tokens_cached_total),
        ("prompt_seconds_total", "counter", "Total time spent processing prompts",
         m.prompt_seconds_total),
        ("tokens_predicted_total", "counter", "Number of generation tokens processed",
         m.tokens_predicted_total),
        ("tokens_predicted_seconds_total", "counter", "Total time spent generating tokens",
         m.tokens_predicted_seconds_total),
        ("n_decode_total", "counter",
         "Total number of llama_decode() calls, excluding speculative decoding and multimodal decoding",
         m.n_decode_total),
        ("n_tokens_max", "counter", "Largest observed sequence length (prompt + generation)",
         m.n_tokens_max),
        ("spec_decode_num_draft_tokens_total", "counter",
         "Speculative: Total draft tokens generated", 0),
        ("spec_decode_num_accepted_tokens_total", "counter",
         "Speculative: Total draft tokens accepted by the target model", 0),
        ("spec_decode_num_drafts_total", "counter",
         "Speculative: Total speculative decoding verification steps", 0),
        ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s", prompt_rate),
        ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s",
         predicted_rate),
        ("requests_processing", "gauge", "Number of requests processing",
         engine.requests_processing),
        ("requests_deferred", "gauge", "Number of requests deferred", engine.requests_deferred),
        ("n_busy_slots_per_decode", "gauge",
         "Average number of busy slots per llama_decode() call", busy),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines.append(f"# HELP llamacpp:{name} {help_text}")
        lines.append(f"# TYPE llamacpp:{name} {kind}")
        lines.append(f"llamacpp:{name} {_metric_value(value)}")
    return "\n".join(lines) + "\n"
