"""``proxy/heap.py``: freed relay buffers stay in the heap for reuse instead of being given
back to the kernel and faulted in again on the next request (glibc, in a fresh process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Allocates 40 body-sized buffers (64 KiB: glibc's heap, not pymalloc), frees them, and
# prints the heap's size (mallinfo2().arena) before and after the free.
PROBE = """
import ctypes, sys
from proxy import heap
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = heap.keep_freed_heap() if sys.argv[1] == "tuned" else None
blocks = [bytes(65536) for _ in range(40)]
before = libc.mallinfo2().arena
del blocks
print(applied, before, libc.mallinfo2().arena)
"""


def probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
        check=True,
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="glibc on Linux only")
def test_freed_body_buffers_stay_in_the_heap() -> None:
    # Without the settings glibc trims the freed top of the heap (what the proxy paid for in
    # brk calls and page faults on every few 64 KiB relays): the probe can see a trim ...
    applied, before, after = probe("default")
    assert applied == "None"
    assert after < before - 1024 * 1024, (before, after)
    # ... and with them the same buffers stay, ready for the next request.
    applied, before, after = probe("tuned")
    assert applied == "True"
    assert after == before, (before, after)
