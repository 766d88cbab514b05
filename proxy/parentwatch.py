"""A worker ends when its supervisor does.

``jalur run --workers N`` workers serve on a socket their supervisor bound; the supervisor
owns the admin listener (readiness, metrics), restarts and drains. A worker left behind by a
supervisor killed with SIGKILL would keep serving with nothing to report or stop it. Two
layers, as runit/tini-style supervisors do:

- ``die_with_parent``: Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` through ctypes: the kernel
  sends SIGTERM the moment the parent exits, whatever killed it, and the worker drains as on
  any SIGTERM;
- ``watch_parent``: every ``WATCH_INTERVAL`` the worker compares ``getppid()`` with the
  supervisor's pid (elsewhere than Linux, or if prctl is unavailable); a change means the
  worker was re-parented, so it stops the same way.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Final

# prctl(2) option: the signal sent to this process when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG: Final = 1
# Seconds between two getppid() checks: bounds how long an orphaned worker keeps serving
# when the parent-death signal is not available.
WATCH_INTERVAL: Final = 1.0


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel for ``sig`` when the parent process exits; True if it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def orphaned(parent: int) -> bool:
    """True once this process no longer has ``parent`` as its parent."""
    return os.getppid() != parent


def parent_gone(parent: int) -> bool:
    """True once ``parent`` has died, even while this process is still its child: a process
    killed with SIGKILL dies thread by thread, and the kernel first hands its children to a
    surviving thread of the same process (``getppid()`` unchanged) and sends them the
    parent-death signal then. Its main thread is a zombie by that time."""
    if orphaned(parent):
        return True
    try:
        with open(f"/proc/{parent}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return not sys.platform.startswith("linux")
    # pid (comm) state ...: comm may hold spaces and parentheses; the state follows the last ")".
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


async def watch_parent(
    parent: int, on_orphaned: Callable[[], None], interval: float = WATCH_INTERVAL
) -> None:
    """Call ``on_orphaned`` once ``parent`` is no longer this process's parent."""
    while not orphaned(parent):  # noqa: ASYNC110 - polling getppid(): no event to wait on
        await asyncio.sleep(interval)
    on_orphaned()
