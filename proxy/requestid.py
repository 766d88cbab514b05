"""Request ids: UUID-shaped, unique, and cheap enough to make one per request.

``uuid.uuid4()`` reads 16 random bytes from the kernel (a ``getrandom`` system call) and
builds a ``UUID`` object for every request: ~2 µs, 3 % of a proxied request's CPU in the
profile (loadtests/RESULTS.md). ``RequestIds`` draws 74 random bits once per process (and
again in every forked child, so workers never share them) and appends a 48-bit counter:
``xxxxxxxx-xxxx-4xxx-yxxx-cccccccccccc``. The result has the shape of a version-4 UUID, so
whatever parses ``x-request-id`` as a UUID keeps working; it is unique as long as two
processes do not draw the same 74 bits, and a process wraps its counter only after 2**48
requests (then it draws new bits).
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["RequestIds", "new_id"]

# Requests numbered under one random prefix before a new one is drawn (48 bits of hex).
_COUNTER_SPAN: Final = 1 << 48


class RequestIds:
    """Callable: the next request id of this process."""

    __slots__ = ("_n", "_prefix")

    def __init__(self) -> None:
        self._prefix = ""
        self._n = 0
        self.reseed()

    def reseed(self) -> None:
        """Draw a new random prefix (at start-up, after ``fork``, on counter wrap)."""
        r = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 used
        a = r >> 48  # 32 bits
        b = (r >> 32) & 0xFFFF
        c = (r >> 20) & 0x0FFF  # after the version nibble
        d = (r >> 6) & 0x3FFF  # after the variant bits
        self._prefix = f"{a:08x}-{b:04x}-4{c:03x}-{0x8000 | d:04x}-"
        self._n = 0

    def __call__(self) -> str:
        n = self._n = self._n + 1
        if n >= _COUNTER_SPAN:
            self.reseed()
            n = self._n = 1
        return f"{self._prefix}{n:012x}"


new_id: Final = RequestIds()
os.register_at_fork(after_in_child=new_id.reseed)
