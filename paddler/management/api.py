"""The fleet management API (Klein), served on the management port.

Routes (JSON in and out, documented in docs/management.md)::

    GET    /health
    GET    /api/v1/upstreams
    GET    /api/v1/upstreams/{id}
    POST   /api/v1/upstreams                      register {url, name, api_key?}
    DELETE /api/v1/upstreams/{id}[?force=true]    drain, then remove when idle
    POST   /api/v1/upstreams/{id}/drain
    POST   /api/v1/upstreams/{id}/undrain
    GET    /api/v1/agents
    POST   /api/v1/agents                         register {agent_id, url, name}: 201 with its token
    POST   /api/v1/agents/{agent_id}/report       Authorization: Bearer AGENT_TOKEN
    GET    /api/v1/models                         the fleet's models (router-mode upstreams)
    POST   /api/v1/upstreams/{id}/models/load     {model}: POST /models/load on a router
    POST   /api/v1/upstreams/{id}/models/unload   {model}: POST /models/unload on a router
    POST   /api/v1/upstreams/{id}/models/pin      {model}: placement never evicts it there
    POST   /api/v1/upstreams/{id}/models/unpin    {model}

``{id}`` is an upstream's id, name or URL. POST and DELETE need
``Authorization: Bearer TOKEN`` when a management token is configured; a
report always needs its agent's own token (issued once by the registration),
and that token may also drain, undrain and delete the agent's own upstream.
Every URL is vetted first (L{paddler.fleet.addresses}): the balancer itself,
link-local and metadata addresses are refused.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from paddler.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    UpstreamFailed,
    error_response,
    json_response,
)
from paddler.fleet.addresses import AddressVetter, UpstreamRefused, Vetted, canonical_url
from paddler.fleet.models import fleet_models
from paddler.fleet.routers import children_of
from paddler.llamacpp.errors import error_message
from paddler.upstream.failures import describe_failure
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.registry import AgentCredential, AgentRegistry, RegistrationRefused, RegistryConflict
from paddler.fleet.upstream import Upstream, upstream_id
from paddler.management.validation import (
    MAX_NAME,
    agent_id as checked_agent_id,
    agent_report,
    flag_argument,
    json_object,
    string_field,
    url_field,
)
from paddler.server.instance import THIS_BALANCER
from paddler.server.router import json_errors

#: Seconds a registration waits for the new upstream's first probe.
REGISTER_WAIT = 5.0


class ManagementAPI:
    """
    The management app. Dependencies come in C{__init__}; use
    C{ManagementAPI(...).app.resource()} as the management port's default
    resource. C{probes} (a L{paddler.probe.ProbeService}, or C{None}) lets a
    registration wait for the new upstream's first probe.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        pool: UpstreamPool,
        registry: AgentRegistry,
        clock: IReactorTime,
        probes: Any = None,
        token: str | None = None,
        register_wait: float = REGISTER_WAIT,
        own_urls: Callable[[], set[str]] | None = None,
        post: Any = None,
        post_timeout: float = 30.0,
        vetter: AddressVetter | None = None,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.clock = clock
        self.probes = probes
        self._token = token.encode("utf-8") if token else None
        self.register_wait = register_wait
        self.own_urls = own_urls or set
        #: C{post(router, path, body)} -> Deferred (status, body): sends model commands to routers.
        self.post = post
        self.post_timeout = post_timeout
        #: vets every URL before it becomes an upstream (no resolver: names are taken as given)
        self.vetter = vetter if vetter is not None else AddressVetter(clock)

    def _vetted(self, url: str) -> Deferred[Vetted]:
        """C{url} vetted (canonical form), or failing with the 400/403 that says why."""
        self._not_this_balancer(url)

        def refused(failure: Any) -> None:
            failure.trap(UpstreamRefused)
            error = failure.value
            self.log.warn("refused upstream url {url}: {reason}", url=url, reason=error.message)
            if error.status == 403:
                raise Forbidden(error.message, param="url")
            raise BadRequest(error.message, param="url")

        def canonical_not_itself(vetted: Vetted) -> Vetted:
            self._not_this_balancer(vetted.url)
            return vetted

        d = self.vetter.vet(url)
        d.addErrback(refused)
        d.addCallback(canonical_not_itself)
        return d

    def _not_this_balancer(self, url: str) -> None:
        """Refuse C{url} when it is one of this balancer's own listeners."""
        if url in self.own_urls():
            raise BadRequest(
                f"url {url} is this balancer itself (one of its listeners), not a llama.cpp server",
                param="url",
            )

    # -- plumbing ---------------------------------------------------------

    def _json(self, request: Any, status: int, body: Any) -> bytes:
        return json_response(
            request, status, body, {b"content-type": b"application/json", b"cache-control": b"no-store"}
        )

    @staticmethod
    def _bearer(request: Any) -> bytes | None:
        # Bytes throughout: the agent sends the token UTF-8 encoded.
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return None
        return given.strip()[:4096]

    def _is_admin(self, given: bytes | None) -> bool:
        return self._token is not None and given is not None and hmac.compare_digest(given, self._token)

    def _authorize(self, request: Any, upstream: Upstream | None = None) -> None:
        """
        The management token (when one is configured), or, for C{upstream},
        the token of the agent that registered it.
        """
        self._refuse_cross_site(request)
        if self._token is None:
            return
        given = self._bearer(request)
        if given is None:
            raise Unauthorized(
                "this call needs Authorization: Bearer <management token>",
                headers={b"www-authenticate": b'Bearer realm="paddler"'},
                param="authorization",
            )
        if self._is_admin(given):
            return
        if upstream is not None:
            owner = self.registry.token_owner(given)
            if owner is not None and upstream_id(owner.url) == upstream.id:
                return
        raise Forbidden("the management token is not valid", param="authorization")

    def _agent(self, request: Any, agent_id: str) -> AgentCredential:
        """The registration of C{agent_id}, if the request carries its token (else 401/403)."""
        self._refuse_cross_site(request)
        given = self._bearer(request)
        if given is None:
            raise Unauthorized(
                "an agent report needs Authorization: Bearer <agent token>; an agent gets its token "
                "from POST /api/v1/agents (registration)",
                headers={b"www-authenticate": b'Bearer realm="paddler-agent"'},
                param="authorization",
            )
        credential = self.registry.authenticate(agent_id, given)
        if credential is not None:
            return credential
        owner = self.registry.token_owner(given)
        if owner is not None:
            raise Forbidden(
                f"this token belongs to agent {owner.agent_id!r}: an agent may report only for itself",
                param="agent_id",
            )
        raise Unauthorized(
            f"no agent {agent_id!r} is registered with this token (the balancer may have restarted, "
            "or the agent expired): register again with POST /api/v1/agents",
            headers={b"www-authenticate": b'Bearer realm="paddler-agent", error="invalid_token"'},
            param="authorization",
        )

    @staticmethod
    def _refuse_cross_site(request: Any) -> None:
        """
        A web page elsewhere must not change the fleet through a visitor's
        browser (a loopback API without a token is otherwise open to it):
        browsers mark a cross-site request with C{Sec-Fetch-Site} and
        C{Origin}; agents, curl and the dashboard itself are not refused.
        """
        site = request.getHeader(b"sec-fetch-site")
        if site is not None and site.lower() not in (b"same-origin", b"none"):
            raise Forbidden("cross-site requests may not change the fleet", param="origin")
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        host = request.getHeader(b"host") or b""
        if origin.lower() == b"null" or origin.split(b"://", 1)[-1].lower() != host.lower():
            raise Forbidden("requests from another origin may not change the fleet", param="origin")

    def _upstream(self, key: str) -> Upstream:
        upstream = self.pool.find(key)
        if upstream is None:
            raise NotFound(f"no upstream with id, name or url {key[:200]!r}", param="id")
        return upstream

    def _describe(self, upstream: Upstream) -> dict[str, Any]:
        described = upstream.describe(self.clock.seconds())
        described["removal_pending"] = self.pool.removal_pending(upstream.id)
        return described

    # -- routes: reading --------------------------------------------------

    @app.route("/health", methods=["GET"])
    def health(self, request: Any) -> bytes:
        return self._json(
            request, 200,
            {"status": "ok", "upstreams": len(self.pool.upstreams), "agents": len(self.registry.agents)},
        )

    @app.route("/api/v1/upstreams", methods=["GET"])
    def list_upstreams(self, request: Any) -> bytes:
        return self._json(
            request, 200, {"upstreams": [self._describe(u) for u in self.pool.upstreams.values()]}
        )

    @app.route("/api/v1/upstreams/<path:key>", methods=["GET"])
    def get_upstream(self, request: Any, key: str) -> bytes:
        return self._json(request, 200, self._describe(self._upstream(key)))

    @app.route("/api/v1/agents", methods=["GET"])
    def list_agents(self, request: Any) -> bytes:
        now = self.clock.seconds()
        return self._json(
            request, 200, {"agents": [a.describe(now) for a in self.registry.agents.values()]}
        )

    # -- routes: changing -------------------------------------------------

    @app.route("/api/v1/upstreams", methods=["POST"])
    def register(self, request: Any) -> Any:
        self._authorize(request)
        body = json_object(request)
        unknown = sorted(set(body) - {"url", "name", "api_key"})
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0][:100]!r} (allowed: url, name, api_key)", param=unknown[0][:100]
            )
        url = url_field(body, "url")
        name = string_field(body, "name", required=True, max_length=MAX_NAME)
        api_key = string_field(body, "api_key", required=False)
        assert name is not None
        d = self._vetted(url)
        d.addCallback(lambda vetted: self._register_vetted(request, body, vetted.url, name, api_key))
        return d

    def _register_vetted(self, request: Any, body: dict[str, Any], url: str, name: str,
                         api_key: str | None) -> Any:
        if url in self.registry.refused_urls:
            raise BadRequest(f"url {url} answered as this balancer itself, not a llama.cpp server", param="url")
        existing = self.pool.upstreams.get(upstream_id(url))
        if existing is not None:
            if existing.source == "agent":
                raise Conflict(f"url {url} is reported by an agent", param="url")
            if existing.name != name:
                raise Conflict(f"url {url} is already registered as {existing.name!r}", param="url")
            if self.pool.removal_pending(existing.id):
                self.pool.undrain(existing.id)  # registered again: keep it after all
            if "api_key" in body:
                existing.api_key = api_key  # the latest registration's key applies
            return self._json(request, 200, self._describe(existing))
        for other in self.pool.upstreams.values():
            if other.name == name:
                raise Conflict(f"name {name!r} is already used by the upstream at {other.url}", param="name")
        upstream = self.pool.add(Upstream(url, name, api_key, source="api", clock=self.clock))
        self.log.info("registered {name} ({url}) through the management API", name=name, url=url)
        return self._after_first_probe(request, upstream)

    def _after_first_probe(self, request: Any, upstream: Upstream) -> Any:
        """Answer 201 once the first probe is done (or after C{register_wait})."""
        if self.probes is None:
            return self._json(request, 201, self._describe(upstream))
        probed: Deferred[None] = self.probes.probe_now(upstream)
        probed.addTimeout(self.register_wait, self.clock)
        probed.addErrback(lambda f: f.trap(DeferredTimeout))
        probed.addCallback(lambda _: self._registered(request, upstream))
        return probed

    def _registered(self, request: Any, upstream: Upstream) -> bytes:
        if upstream.last_error == THIS_BALANCER:  # its first probe was answered by this very balancer
            self.pool.remove(upstream.id)
            self.log.warn(
                "refused to register {url}: it is this balancer itself", url=upstream.url
            )
            return error_response(
                request,
                BadRequest(f"url {upstream.url} is this balancer itself, not a llama.cpp server", param="url"),
            )
        return self._json(request, 201, self._describe(upstream))

    @app.route("/api/v1/upstreams/<path:key>", methods=["DELETE"])
    def delete(self, request: Any, key: str) -> bytes:
        self._authorize(request, self.pool.find(key))
        force = flag_argument(request, b"force")
        upstream = self._upstream(key)
        if force:
            self.pool.remove(upstream.id)
            return self._json(request, 200, {"removed": True, "upstream": self._describe(upstream)})
        removal = self.pool.remove_when_idle(upstream.id)
        removed = removal is not None and removal.called
        return self._json(
            request, 200 if removed else 202, {"removed": removed, "upstream": self._describe(upstream)}
        )

    @app.route("/api/v1/upstreams/<path:key>/drain", methods=["POST"])
    def drain(self, request: Any, key: str) -> bytes:
        self._authorize(request, self.pool.find(key))
        upstream = self._upstream(key)
        self.pool.drain(upstream.id, requested=True)
        return self._json(request, 200, self._describe(upstream))

    @app.route("/api/v1/upstreams/<path:key>/undrain", methods=["POST"])
    def undrain(self, request: Any, key: str) -> bytes:
        self._authorize(request, self.pool.find(key))
        upstream = self._upstream(key)
        self.pool.undrain(upstream.id)
        return self._json(request, 200, self._describe(upstream))

    # -- routes: models (router-mode upstreams) ----------------------------

    @app.route("/api/v1/models", methods=["GET"])
    def list_models(self, request: Any) -> bytes:
        return self._json(request, 200, fleet_models(self.pool.upstreams.values(), int(self.clock.seconds())))

    @app.route("/api/v1/upstreams/<path:key>/models/load", methods=["POST"])
    def load_model(self, request: Any, key: str) -> Any:
        return self._model_command(request, key, "load")

    @app.route("/api/v1/upstreams/<path:key>/models/unload", methods=["POST"])
    def unload_model(self, request: Any, key: str) -> Any:
        return self._model_command(request, key, "unload")

    @app.route("/api/v1/upstreams/<path:key>/models/pin", methods=["POST"])
    def pin_model(self, request: Any, key: str) -> bytes:
        return self._pin(request, key, True)

    @app.route("/api/v1/upstreams/<path:key>/models/unpin", methods=["POST"])
    def unpin_model(self, request: Any, key: str) -> bytes:
        return self._pin(request, key, False)

    def _pin(self, request: Any, key: str, pinned: bool) -> bytes:
        self._authorize(request)
        router, model = self._router_and_model(request, key)
        [child] = [c for c in children_of(self.pool.upstreams.values(), router) if c.router_model == model]
        child.pinned = pinned
        self.log.info("model {model} on {name} {what} through the management API",
                      model=model, name=router.name, what="pinned" if pinned else "unpinned")
        self.pool.notify("changed", child)
        return self._json(request, 200, self._describe(child))

    def _router_and_model(self, request: Any, key: str) -> tuple[Upstream, str]:
        """The router named by C{key} (or the router of the model upstream C{key}) and the body's model."""
        router = self._upstream(key)
        if router.parent_id is not None:  # a model's child upstream: its router
            router = self._upstream(router.parent_id)
        if router.role != "router":
            raise BadRequest(f"upstream {router.name!r} is not a router-mode llama-server", param="id")
        body = json_object(request)
        unknown = sorted(set(body) - {"model"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:100]!r} (allowed: model)", param=unknown[0][:100])
        model = string_field(body, "model", required=True)
        assert model is not None
        if model not in {c.router_model for c in children_of(self.pool.upstreams.values(), router)}:
            raise NotFound(f"upstream {router.name!r} has no model {model[:200]!r}", param="model")
        return router, model

    def _model_command(self, request: Any, key: str, command: str) -> Any:
        self._authorize(request)
        router, model = self._router_and_model(request, key)
        if self.post is None:
            raise Conflict("this balancer cannot send model commands (no upstream client)")
        sent: Deferred[tuple[int, bytes]] = self.post(router, f"/models/{command}", {"model": model})
        sent.addTimeout(self.post_timeout, self.clock)

        def answered(result: tuple[int, bytes]) -> Any:
            code, raw = result
            if code != 200:
                raise Conflict(f"{router.name} answered {code}: {error_message(raw)}", param="model")
            self.log.info("{command} of model {model} on {name} through the management API",
                          command=command, model=model, name=router.name)
            done = self.probes.probe_now(router) if self.probes is not None else None
            if done is None:
                return self._json(request, 200, {"success": True, "upstream": self._describe(router)})
            done.addTimeout(self.register_wait, self.clock)
            done.addErrback(lambda f: f.trap(DeferredTimeout))
            return done.addCallback(
                lambda _: self._json(request, 200, {"success": True, "upstream": self._describe(router)})
            )

        def failed(failure: Any) -> bytes:
            if isinstance(failure.value, (Conflict, BadRequest)):
                return error_response(request, failure.value)
            reason = describe_failure(failure, self.post_timeout)
            return error_response(request, UpstreamFailed(f"{router.name}: {reason}"))

        return sent.addCallback(answered).addErrback(failed)

    @app.route("/api/v1/agents", methods=["POST"])
    def register_agent(self, request: Any) -> Any:
        """
        Register an agent: C{{agent_id, url, name}}. Needs the management token
        when one is configured; without one, an id held by a live agent is
        given again only to a request carrying that agent's current token.
        Answers 201 with C{agent_token}, shown this once.
        """
        self._authorize(request)
        body = json_object(request)
        unknown = sorted(set(body) - {"agent_id", "url", "name"})
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0][:100]!r} (allowed: agent_id, url, name)", param=unknown[0][:100]
            )
        raw_id = string_field(body, "agent_id", required=True, max_length=64)
        assert raw_id is not None
        agent_id = checked_agent_id(raw_id)
        url = url_field(body, "url")
        name = string_field(body, "name", required=True, max_length=MAX_NAME)
        assert name is not None
        admin = self._is_admin(self._bearer(request))
        proof = None if admin else self._bearer(request)
        d = self._vetted(url)
        d.addCallback(lambda vetted: self._agent_registered(request, agent_id, vetted.url, name, proof, admin))
        return d

    def _agent_registered(self, request: Any, agent_id: str, url: str, name: str,
                          proof: bytes | None, admin: bool) -> bytes:
        if url in self.registry.refused_urls:
            raise BadRequest(f"url {url} answered as this balancer itself, not a llama.cpp server", param="url")
        existing = self.pool.upstreams.get(upstream_id(url))
        if existing is not None and existing.source != "agent":
            raise Conflict(f"url {url} is already registered as {existing.name!r} (source {existing.source})",
                           param="url")
        try:
            token = self.registry.register(agent_id, url, name, proof=proof, admin=admin)
        except RegistrationRefused as e:
            raise Conflict(e.message, param=e.field) from None
        return self._json(request, 201, {
            "agent_id": agent_id,
            "agent_token": token,
            "upstream_id": upstream_id(url),
            "url": url,
            "expiry": self.registry.expiry,
        })

    @app.route("/api/v1/agents/<agent_id>/report", methods=["POST"])
    def report(self, request: Any, agent_id: str) -> bytes:
        checked_agent_id(agent_id)
        credential = self._agent(request, agent_id)
        report = agent_report(json_object(request))
        url = canonical_url(report.url)
        if url != credential.url:
            raise Forbidden(
                f"agent {agent_id!r} registered {credential.url} and may report only that upstream "
                "(register again to change it)",
                param="url",
            )
        report = dataclasses.replace(report, url=url)
        self._not_this_balancer(report.url)
        try:
            upstream = self.registry.report(agent_id, report)
        except RegistryConflict as e:
            raise Conflict(e.message, param=e.field) from None
        record = self.registry.agents[agent_id]
        return self._json(request, 200, {
            "agent_id": agent_id,
            "upstream_id": upstream.id,
            "draining": upstream.draining,
            "expiry": self.registry.expiry_for(record),
        })


json_errors(ManagementAPI.app, "management API")
