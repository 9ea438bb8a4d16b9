"""The fleet: the upstreams the balancer knows, their states and slots, and how it learns them.

- ``upstream``: one llama.cpp server (state machine, slot figures, leases);
- ``pool``: membership, the one place where upstream state changes, leases,
  the buffer of waiting requests, draining;
- ``probe``: the ``LoopingCall`` probes of each upstream;
- ``registry``: agent reports and the expiry of silent agents;
- ``static``: upstreams from the configuration and the demo fleet.
"""
