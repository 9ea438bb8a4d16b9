"""A simulated llama.cpp server (``paddler simulate``).

L{paddler.simulator.engine} models slots, the server's own FIFO queue, the
prompt cache and token timing on an injected clock;
L{paddler.simulator.web} serves llama-server's HTTP API on top of it;
L{paddler.simulator.service} builds listeners and in-process fleets.
"""
