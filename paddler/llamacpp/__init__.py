"""What paddler knows of llama-server: reading ``/slots``, ``/props``, ``/metrics`` and
error bodies (shared by the balancer's probes and the agent)."""
