"""Reading llama-server's ``/metrics`` (Prometheus text) with prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_value(text: str, name: str) -> float | None:
    """The value of the first sample called C{name} in C{text}, or C{None} (absent or unparsable)."""
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    return float(sample.value)
    except (ValueError, TypeError, IndexError):
        return None
    return None
