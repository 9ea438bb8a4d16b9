"""The Redis-backed slot state shared by several balancer processes (``--state``, issue 15): leases, readings,
drains and one FIFO of waiting requests, in Redis (L{RedisSlotStore}) or in
memory for tests (L{MemorySlotStore}), both behind L{ISlotStore}."""
