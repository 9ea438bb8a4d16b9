"""The Prometheus names a balancer exports (the final set the docs list), and how to read them back."""

from __future__ import annotations

import re

#: Fleet-wide gauges.
GAUGES = (
    "paddler_slots_idle",
    "paddler_slots_processing",
    "paddler_slots_capacity",
    "paddler_requests_buffered",
    "paddler_slots",
    "paddler_buffer_capacity",
    "paddler_requests_in_flight",
    "paddler_oldest_buffered_wait_seconds",
    "paddler_upstreams_healthy",
    "paddler_upstreams",
)
#: Counters, with the label that splits them.
COUNTERS = {
    "paddler_requests_total": "status_class",
    "paddler_requests_refused_total": "reason",
    "paddler_requests_timed_out_total": "reason",
    "paddler_requests_cancelled_total": "stage",
}
HISTOGRAMS = ("paddler_time_to_first_token_seconds", "paddler_request_duration_seconds")
#: Per upstream, labelled ``upstream``, ``url`` (and ``state`` on gauges).
UPSTREAM = (
    "paddler_upstream_slots_idle",
    "paddler_upstream_slots_processing",
    "paddler_upstream_slots_capacity",
    "paddler_upstream_requests_in_flight",
    "paddler_upstream_healthy",
    "paddler_upstream_last_update_age_seconds",
    "paddler_upstream_requests_served_total",
    "paddler_upstream_requests_failed_total",
    "paddler_upstream_prefix_hits_total",
    "paddler_upstream_prompt_tokens_saved_total",
    "paddler_upstream_prompt_tokens_per_second",
    "paddler_upstream_generation_tokens_per_second",
)
#: Only with ``--state`` (Redis shared state): not expected from a plain balancer.
WITH_SHARED_STATE = ("paddler_shared_state_up", "paddler_shared_state_owners")
#: Every name a balancer without ``--state`` must export (as a family).
EXPECTED = (*GAUGES, *COUNTERS, *HISTOGRAMS, *UPSTREAM)

_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)")


def exposed_names(text: str) -> set[str]:
    """Every name a PromQL selector could use on this exposition: families (from ``# TYPE``),
    a histogram's ``_bucket``/``_sum``/``_count``, and every sample name."""
    names: set[str] = set()
    for line in text.splitlines():
        match = _TYPE.match(line)
        if match:
            name, kind = match.groups()
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            continue
        if line and not line.startswith("#"):
            sample = _SAMPLE.match(line)
            if sample:
                names.add(sample.group(1))
    return names


def families(text: str) -> dict[str, str]:
    """Family name -> type, from the ``# TYPE`` lines."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _TYPE.match(line)
        if match:
            found[match.group(1)] = match.group(2)
    return found
