"""Router-mode llama-servers in the fleet: one child upstream per (router, model).

A llama-server in router mode serves many models on one port, each loaded on
demand in a child instance with its own slots. The balancer keeps the router
itself as an upstream that is probed but takes no request (C{role} =
``router``), and one I{child} upstream per model it lists: same URL, id
derived from the URL and the model, C{router_model} and C{model_state}
(``unloaded``, ``loading``, ``loaded``, ``sleeping``, ``failed``), slots read
from ``/slots?model=M&autoload=false`` while loaded. Leases, the buffer, the
policies and the shared state then work per (upstream, model) unchanged: a
request naming a model is only ever given to a child serving that model.

A child of a sleeping model (``--sleep-idle-seconds``: loaded, but its
memory freed until a request wakes it, which takes about a load) is not asked
its ``/slots`` (that read is a task for llama.cpp and would wake it), keeps the
slots it had, takes requests, and comes after awake copies with a free slot
(L{prefer_loaded}). A child of a model that is not loaded takes requests only when its router
autoloads (the router loads the model for the request); it counts the slots
the model had when last loaded (else the router's largest model's), and is
chosen only when no loaded copy of the model has a free slot
(L{prefer_loaded}).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger

from paddler.fleet.upstream import SlotsSeen, Upstream, upstream_id
from paddler.llamacpp.slots import RouterReading

log = Logger()

__all__ = ["child_id", "children_of", "forget_router", "new_child", "observe_router", "prefer_loaded"]


def child_id(router_url: str, model: str) -> str:
    """The id of the child upstream of the router at C{router_url} that serves C{model}."""
    return upstream_id(router_url + "#model=" + model)


def children_of(upstreams: Iterable[Upstream], parent: Upstream) -> list[Upstream]:
    """The child upstreams of router C{parent}."""
    return [u for u in upstreams if u.parent_id == parent.id]


def new_child(parent: Upstream, model: str) -> Upstream:
    """A new child upstream of router C{parent} for C{model} (not yet in a pool)."""
    child = Upstream(parent.url, name=f"{parent.name}/{model}", api_key=parent.api_key,
                     source="router", clock=parent._clock)
    child.id = child_id(parent.url, model)
    child.parent_id = parent.id
    child.router_model = model
    return child


def observe_router(pool: Any, parent: Upstream, reading: RouterReading, source: str = "probe") -> None:
    """Apply one reading of router C{parent}: itself, then one child per model it lists.

    Children are added for new models and removed for models it no longer
    lists; each gets its state and slots. C{pool} is the L{UpstreamPool};
    C{source}: ``probe``, or ``agent`` for a reading its agent reported.
    """
    if pool.upstreams.get(parent.id) is not parent:
        return
    shared = getattr(pool, "shared", None)
    republish: list[Upstream] = []  # what the other balancers (--state) must hear of
    if parent.role != "router":
        log.info("upstream {name} ({url}) is a router-mode llama-server: {count} models",
                 name=parent.name, url=parent.url, count=len(reading.models))
    if (parent.role, parent.max_instances, parent.autoload) != ("router", reading.max_instances, reading.autoload):
        republish.append(parent)
    parent.role = "router"
    parent.max_instances = reading.max_instances
    parent.autoload = reading.autoload
    names = tuple(n for m in reading.models for n in (m.id, *m.aliases))
    pool.observe(parent, SlotsSeen(0, 0, reading.mark, source=source, models=names, raw_slots=[],
                                   method="router"))
    known = {c.router_model: c for c in children_of(pool.upstreams.values(), parent)}
    largest = max((m.total for m in reading.models if m.state == "loaded"), default=0)
    largest = max([largest, *(c.slots_when_loaded for c in known.values())]) or 1
    listed = set()
    for model in reading.models:
        listed.add(model.id)
        child = known.get(model.id)
        if child is None:
            fresh = new_child(parent, model.id)
            fresh.draining = parent.draining  # a draining router's new model drains too
            child = pool.add(fresh)
        previous = child.model_state
        if previous != model.state or child.exit_code != model.exit_code:
            republish.append(child)
        child.model_state = model.state
        child.exit_code = model.exit_code
        if previous != model.state:
            now = child._clock.seconds() if child._clock is not None else 0.0
            if previous == "loading" and model.state == "loaded":
                child.load_seconds = max(0.0, now - child.model_since)  # learned: the next ETA
            child.model_since = now
        # with --model-placement paddler loads models itself: requests wait for its loads
        child.autoload = reading.autoload and not getattr(pool, "model_placement", False)
        if previous is not None and previous != model.state:
            log.info("model {model} on {name}: {previous} -> {state}", model=model.id,
                     name=parent.name, previous=previous, state=model.state)
        if model.state == "loaded":
            total, processing, mark, raw = model.total, model.processing, model.mark, model.raw_slots
            child.slots_when_loaded = model.total
        else:
            # not loaded: what it had when last loaded, else the router's largest model's
            # (the router loads it for a request)
            total = (child.slots_when_loaded or largest) if model.state != "failed" else 0
            processing, mark, raw = 0, child.probe_mark(), []
        pool.observe(child, SlotsSeen(total, processing, mark, source=source,
                                      models=(model.id, *model.aliases), raw_slots=raw or [], method="router"))
    for name, child in known.items():
        if name not in listed:
            pool.remove(child.id)
    if shared is not None:
        for upstream in republish:
            shared.republish(upstream)


def forget_router(pool: Any, parent: Upstream) -> None:
    """C{parent} is no longer a router (restarted as a single-model server): its model
    upstreams go, and it is read and routed as one server again."""
    parent.role = "single"
    parent.set_models(())
    for child in children_of(pool.upstreams.values(), parent):
        pool.remove(child.id)


def prefer_loaded(candidates: list[Upstream]) -> list[Upstream]:
    """C{candidates} narrowed to the copies of the model that answer soonest.

    An awake loaded copy with a free slot first (the sleeping and unloaded
    copies are dropped); else a sleeping one with a free slot (a request
    wakes it: a reload, about its load time, but no eviction and no place
    taken) before the routers that must load it; only when every running copy
    is busy (or there is none) may the request go to a router that loads it.
    """
    def awake(c: Upstream) -> bool:
        return c.loaded and c.model_state != "sleeping"

    if all(awake(c) for c in candidates):
        return candidates
    if any(awake(c) and c.slots_idle > 0 for c in candidates):
        return [c for c in candidates if awake(c)]
    if any(c.loaded and c.slots_idle > 0 for c in candidates):
        return [c for c in candidates if c.loaded]
    return candidates
