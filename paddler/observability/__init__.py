"""Seeing the fleet: request figures, the fleet snapshot, the event log, the state stream, the
dashboard, Prometheus and StatsD."""
