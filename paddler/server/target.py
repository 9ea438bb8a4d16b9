"""Request targets (RFC 9112 section 3.2): what a client may put after the method.

A reverse proxy builds the upstream URL from the request target, so the
target must be a path: ``/completion?x=1`` (origin-form). Anything else is
either rewritten or refused before any resource sees it:

- absolute-form (``http://host/path``) becomes the origin-form of its path,
  and its authority replaces the ``Host`` header, as RFC 9112 section 3.2.2
  tells an origin server to do;
- authority-form (``host:port``, only meaningful with ``CONNECT``) is
  refused with 405: paddler is not a forward proxy;
- asterisk-form (``*``), relative targets (``69/api``, ``I``) and targets
  with bytes outside visible ASCII are refused with 400.

A request must carry exactly one ``Host`` header (HTTP/1.1 requires one;
HTTP/1.0 may omit it); two are refused with 400.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: Visible ASCII except the space (RFC 9110 section 4.1 and RFC 3986).
_TARGET_BYTES = re.compile(rb"[\x21-\x7e]+")
_ABSOLUTE = re.compile(rb"(?i)(https?)://([^/?#]+)([^#]*)")
_AUTHORITY = re.compile(rb"[A-Za-z0-9._~%!$&'()*+,;=-]+|\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(rb":[0-9]{0,5}")


class TargetRejected(Exception):
    """A request target or Host header that cannot be served; C{status} is 400 or 405."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Target:
    """An accepted request target: the origin-form C{uri} and, for absolute-form, its C{host}."""

    uri: bytes
    host: bytes | None = None


def _valid_authority(authority: bytes) -> bool:
    if b"@" in authority:
        return False  # userinfo is deprecated in http(s) URIs (RFC 9110 section 4.2.4)
    host, port = authority, b""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        host, port = authority[: end + 1], authority[end + 1 :]
    elif b":" in authority:
        cut = authority.rfind(b":")
        host, port = authority[:cut], authority[cut:]
    return bool(_AUTHORITY.fullmatch(host)) and (not port or bool(_PORT.fullmatch(port)))


def check_visible(target: bytes) -> None:
    """L{TargetRejected} (400) unless C{target} is visible ASCII: the request line's check (the channel's too)."""
    if not _TARGET_BYTES.fullmatch(target):
        raise TargetRejected(400, "the request target must be visible ASCII characters (percent-encode the rest)")


def origin_form(target: bytes) -> bytes:
    """
    C{target} if it may go upstream as it is: visible ASCII, a path from
    C{/}, no fragment; else L{TargetRejected} (400). The one rule for what
    the proxy sends (L{check_target} applies it to every request first).
    """
    check_visible(target)
    if not target.startswith(b"/"):
        raise TargetRejected(400, "the request target must be a path starting with /")
    if b"#" in target:
        raise TargetRejected(400, "the request target must not contain a fragment (#)")
    return target


def check_target(method: bytes, target: bytes, host_headers: Sequence[bytes] | None, version: bytes) -> Target:
    """
    The origin-form of C{target}, or L{TargetRejected}.

    @param host_headers: every C{Host} header line the request carried.
    """
    if method.upper() == b"CONNECT":
        raise TargetRejected(405, "CONNECT is not supported: paddler is a reverse proxy, not a tunnel")
    check_visible(target)
    if host_headers is not None and len(host_headers) > 1:
        raise TargetRejected(400, "the request has more than one Host header")
    if host_headers is None and version.upper() == b"HTTP/1.1":
        raise TargetRejected(400, "an HTTP/1.1 request needs a Host header")
    if target.startswith(b"/"):
        return Target(origin_form(target))
    absolute = _ABSOLUTE.fullmatch(target)
    if absolute is not None:
        authority, rest = absolute.group(2), absolute.group(3)
        if not _valid_authority(authority):
            raise TargetRejected(400, "the absolute request target has an invalid host")
        if rest.startswith(b"?") or not rest:
            rest = b"/" + rest
        return Target(rest, authority)
    if target == b"*":
        raise TargetRejected(400, "the asterisk-form request target (*) is not supported")
    raise TargetRejected(400, "the request target must be a path starting with / or an absolute http(s) URL")
