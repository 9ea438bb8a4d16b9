"""The memory all request bodies may hold at once, across every connection of the process.

A request body is kept whole until its request ends (the proxy may send it
to a second upstream), so a few hundred clients sending large bodies at the
same time could take the process's memory. Every body claims its bytes
here before it is read (its C{Content-Length}, or chunk by chunk for a
chunked body) and gives them back when its request ends; a body that would
take the total above C{limit} is refused (HTTP 503) before it is read.
"""

from __future__ import annotations


class BodyMemory:
    """
    Bytes claimed by the request bodies held now, against a C{limit}.

    @ivar held: bytes claimed now.
    @ivar peak: the highest C{held} seen.
    @ivar refused: claims refused so far.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.refused = 0

    def claim(self, size: int) -> bool:
        """Claim C{size} more bytes; C{False} (and nothing claimed) when that would pass the limit."""
        if size <= 0:
            return True
        if self.held + size > self.limit:
            self.refused += 1
            return False
        self.held += size
        self.peak = max(self.peak, self.held)
        return True

    def release(self, size: int) -> None:
        """Give back C{size} bytes claimed before."""
        self.held = max(0, self.held - size)
