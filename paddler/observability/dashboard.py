"""The Klein app of the management port's read side: the state API and its stream, the
dashboard page (package data C{paddler/observability/assets/}) and C{/metrics}.

Routes (the app sees whole paths, see L{paddler.server.router.PrefixRouter}):

- C{GET /api/v1/state}: L{paddler.observability.snapshot.FleetView.state} as JSON
  (C{?history=0} leaves the history out);
- C{GET /api/v1/state/stream}: the same as server-sent events
  (L{paddler.observability.stream.StateStream});
- C{GET /dashboard}, C{/dashboard/}, C{/dashboard/app.js}, C{/dashboard/style.css};
- C{GET /metrics}: Prometheus text (L{paddler.observability.prometheus.PrometheusMetrics}).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from klein import Klein
from paddler.errors import error_body, json_response
from paddler.observability.stream import StateStream
from paddler.server.router import json_errors


def _asset(name: str) -> bytes:
    return resources.files("paddler.observability").joinpath("assets", name).read_bytes()


#: Files of the dashboard (package data C{paddler/observability/assets/}) and their types.
DASHBOARD_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: The page loads only its own files and talks only to its own origin.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ObservabilityApp:
    """
    The Klein app of the state API, the dashboard and C{/metrics}.

    @param state: builds the state; called with C{True} to include the history.
    @param stream: the live stream (L{StateStream}).
    @param metrics: has C{render() -> bytes} and C{content_type}; C{None}
        answers C{/metrics} with 404.
    @param dashboard: C{False} (C{--no-dashboard}) answers C{/dashboard} with 404.
    """

    app = Klein()

    def __init__(
        self,
        state: Callable[[bool], dict[str, Any]],
        stream: StateStream,
        metrics: Any = None,
        dashboard: bool = True,
    ) -> None:
        self.state = state
        self.stream = stream
        self.metrics = metrics
        self.dashboard = dashboard
        self._assets: dict[str, bytes] = {}

    def resource(self) -> Any:
        return self.app.resource()

    @staticmethod
    def _json(request: Any, status: int, body: bytes) -> bytes:
        return json_response(request, status, body, {b"cache-control": b"no-store"})

    @app.route("/api/v1/state", methods=["GET"])
    def get_state(self, request: Any) -> bytes:
        with_history = request.args.get(b"history", [b"1"])[-1] not in (b"0", b"false", b"no")
        body = json.dumps(self.state(with_history), separators=(",", ":")).encode("utf-8")
        return self._json(request, 200, body)

    @app.route("/api/v1/state/stream", methods=["GET"])
    def get_stream(self, request: Any) -> Any:
        if not self.stream.running:
            return self._json(
                request, 503, error_body(503, "the state stream is not running", "unavailable_error")
            )
        if request.method == b"HEAD":
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            return b""
        return self.stream.attach(request)

    @app.route("/metrics", methods=["GET"])
    def get_metrics(self, request: Any) -> bytes:
        if self.metrics is None:
            return self._json(request, 404, error_body(404, "metrics are off", "not_found_error"))
        request.setHeader(b"content-type", self.metrics.content_type.encode("ascii"))
        return self.metrics.render()

    @app.route("/dashboard", methods=["GET"])
    def get_dashboard(self, request: Any) -> bytes:
        return self._serve_asset(request, "index.html", assets="dashboard/")

    @app.route("/dashboard/", methods=["GET"])
    def get_dashboard_slash(self, request: Any) -> bytes:
        return self._serve_asset(request, "index.html", assets="")

    @app.route("/dashboard/<string:name>", methods=["GET"])
    def get_dashboard_asset(self, request: Any, name: str) -> bytes:
        if name == "index.html" or name not in DASHBOARD_ASSETS:
            return self._json(
                request, 404, error_body(404, f"no such path: /dashboard/{name}", "not_found_error")
            )
        return self._serve_asset(request, name)

    def _serve_asset(self, request: Any, name: str, assets: str = "") -> bytes:
        if not self.dashboard:
            return self._json(
                request,
                404,
                error_body(404, "the dashboard is off (--no-dashboard)", "not_found_error"),
            )
        if name not in self._assets:
            self._assets[name] = _asset(name)
        body = self._assets[name]
        if name == "index.html":
            # Asset URLs relative to where the page was asked for, so the page
            # works at /dashboard and /dashboard/ and behind a path prefix.
            body = body.replace(b"{{assets}}", assets.encode("ascii"))
        request.setHeader(b"content-type", DASHBOARD_ASSETS[name].encode("ascii"))
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", DASHBOARD_CSP.encode("ascii"))
        request.setHeader(b"referrer-policy", b"no-referrer")
        return body


json_errors(ObservabilityApp.app, "observability")
