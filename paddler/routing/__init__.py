"""How an upstream is chosen for a request.

L{paddler.routing.policies} holds the policies given to ``--policy``.
For the prompt cache and for speed: L{paddler.routing.prompt} derives what
llama.cpp will evaluate for a request (a stable text, its estimated tokens,
the conversation key); L{paddler.routing.prefix} models, per upstream,
llama-server's host-memory prompt cache from the prompts sent there; L{paddler.routing.speed} learns
each upstream's prompt and generation speeds and how fast its slots free
up; L{paddler.routing.cost} ranks the candidates by estimated time to first
token (and, for ``cache-aware``, the generation time of a cold request); L{paddler.routing.router} ties them together for the pool. Nothing
here does I/O; time comes from an injected clock.
"""
