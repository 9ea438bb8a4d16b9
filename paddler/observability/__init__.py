"""Seeing the fleet: request figures, the fleet snapshot, the state stream, the dashboard,
Prometheus and StatsD."""
