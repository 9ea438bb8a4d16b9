"""llama-server's error answers: the OpenAI-shaped body and the "Loading model" 503."""

from __future__ import annotations

import json

#: The message llama-server answers with 503 while it loads its model.
LOADING_MESSAGE = "Loading model"


class ProbeError(Exception):
    """An answer that says the server cannot serve (a bad status or an unreadable body)."""


class NeedsKey(ProbeError):
    """The server answered 401: it wants an API key the prober was not given."""


class Loading(Exception):
    """The server answered 503 "Loading model"."""


def error_message(body: bytes) -> str:
    """The C{error.message} of a llama-server error body, else the start of the body as text."""
    try:
        parsed = json.loads(body)
        return str(parsed["error"]["message"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return body[:200].decode("utf-8", "replace")
