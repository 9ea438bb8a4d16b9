"""paddler: a slot-aware load balancer for fleets of llama.cpp servers."""

__version__ = "0.1.0"
