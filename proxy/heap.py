"""glibc malloc settings for a process that relays bodies: keep freed heap for reuse.

A relayed 64 KiB body passes through a few buffers of that size (the read buffer's bytes,
llhttp's body slice, the joined chunk). They are above pymalloc's 512-byte limit, so glibc
serves them from the heap, and on ``free`` glibc gives the heap's top back to the kernel
once 128 KiB of it is free (``M_TRIM_THRESHOLD``). Under load that is every few requests:
``strace -c`` of Jalur at 64 KiB, 50 connections: 1,486 ``brk`` calls in 4 s (one per
~2.5 requests), each shrink followed by a grow whose pages the kernel must fault in and zero
again. NGINX keeps its buffers; so does this, within a bound:

* ``M_TRIM_THRESHOLD`` = ``TRIM_THRESHOLD``: free heap above it is still returned, so a
  one-off spike (a burst of large bodies) does not stay resident;
* ``M_MMAP_THRESHOLD`` = ``MMAP_THRESHOLD``: a fixed value (glibc otherwise moves it) so
  buffers up to 1 MiB come from the heap and are reused, not mapped and unmapped each time.

Applied once at start (``jalur run``, each worker, ``jalur demo``); a no-op where the C
library has no ``mallopt`` (musl, macOS).

``release`` (glibc ``malloc_trim``) gives back free pages anywhere in the heap, not only at
its top: a burst of connections that each held a request head (hundreds of KiB apiece,
interleaved with long-lived objects) leaves the heap fragmented, and the trim threshold alone
would keep it resident. The listener calls it once after many connections have gone
(``server._Server``), never per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

log = logging.getLogger("jalur")

# Free heap kept before returning it to the kernel. Bounds the resident memory a past burst
# can leave behind; 32 MiB holds the buffers of ~500 concurrent 64 KiB relays.
TRIM_THRESHOLD: Final = 32 * 1024 * 1024
# Allocations up to this size come from the (reused) heap; larger ones are mapped and
# returned on free, so a single huge buffer never pins memory.
MMAP_THRESHOLD: Final = 1024 * 1024
_M_TRIM_THRESHOLD: Final = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD: Final = -3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release() -> bool:
    """Return every free heap page to the kernel (the top too: this runs after a burst,
    not under steady load, where ``TRIM_THRESHOLD`` keeps buffers for reuse); True if the C
    library has ``malloc_trim`` and released something."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return bool(trim(0))


def keep_freed_heap() -> bool:
    """Apply the settings above; True if the C library took both."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and ok
    if not ok:
        log.warning("mallopt refused the heap settings; glibc's defaults stay")
    return ok
