"""A simulated llama.cpp server (``paddler simulate``).

Where things are:

- L{paddler.simulator.engine}: slots, the server's own FIFO queue, token timing on an
  injected clock (L{SimulatorConfig} holds the ``llama-server`` flags);
- L{paddler.simulator.cache}: the prompt cache (slot contents, slot choice by
  similarity then LRU, the host-memory ``--cache-ram`` cache);
- L{paddler.simulator.tokenizer}: the simulated model's stable, cheap tokenizer;
- L{paddler.simulator.validation}: request parsing and llama-server's exact 400 messages;
- L{paddler.simulator.formats}: response bodies (completion, chat, OpenAI, SSE, /slots, /props);
- L{paddler.simulator.metrics}: the ``/metrics`` text;
- L{paddler.simulator.web}: the routes and the HTTP relay of a running job;
- L{paddler.simulator.service}: listeners and in-process fleets;
- L{paddler.simulator.testing}: an in-memory HTTP client for tests.
"""
