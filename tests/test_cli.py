"""The command line as a new user meets it: --help of every command, `jalur version`,
`jalur demo --port-base`."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy import __version__, cli

from .conftest import free_port


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser, with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_every_command_has_clean_help() -> None:
    """No ==SUPPRESS==, the internal `worker` not listed, every command and option explained."""
    parser = cli._parser()
    top = parser.format_help()
    assert "worker" not in top
    found = []
    for path, sub in commands(parser):
        if path[:1] == ("worker",):
            continue  # started by the supervisor only
        found.append(" ".join(path))
        text = sub.format_help()
        assert "SUPPRESS" not in text, path
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = {a.dest for a in action._choices_actions}
                public = {n for n in action.choices if n != "worker"}
                assert listed == public, (path, listed ^ public)
                assert all(a.help for a in action._choices_actions), path
            elif action.help != argparse.SUPPRESS:
                assert action.help, (
                    f"jalur {' '.join(path)}: {action.option_strings or action.dest}"
                )
    for expected in ("run", "demo", "migration ramp", "audit verify", "version"):
        assert expected in found


def test_help_as_run_prints_no_suppress() -> None:
    for argv in ([], ["demo"], ["migration"], ["migration", "ramp"], ["audit", "verify"]):
        done = subprocess.run(
            [sys.executable, "-m", "proxy", *argv, "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "SUPPRESS" not in done.stdout
        assert done.stdout.startswith("usage: jalur"), done.stdout


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        rf"jalur {re.escape(__version__)} \(python [\d.]+, aiohttp [\d.]+ with its C parser, "
        r"uvloop [\d.]+\)\n",
        done.stdout,
    ), done.stdout


# -- jalur demo --port-base ------------------------------------------------------------------

# The built-in demo's ports, relative to its proxy port 8080.
DEMO_OFFSETS = (0, 9901 - 8080, *(p - 8080 for p in range(9001, 9007)))


def free_base() -> int:
    """A proxy port N such that N and every demo port moved with it are free now."""
    for _ in range(50):
        base = free_port()
        if base + max(DEMO_OFFSETS) > 65535:
            continue
        taken = False
        for offset in DEMO_OFFSETS:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + offset))
                except OSError:
                    taken = True
                    break
        if not taken:
            return base
    raise AssertionError("no free port range for the demo")


async def test_demo_port_base_moves_every_port_together(tmp_path: Path) -> None:
    base = free_base()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port-base", str(base),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            first = (await proc.stdout.readline()).decode()
        assert first.strip() == (
            f"Jalur demo: proxy on http://127.0.0.1:{base}, admin on http://127.0.0.1:{base + 1821}"
        ), first
        async with asyncio.timeout(20):
            banner = (await proc.stdout.read(4096)).decode()
        assert f"http://127.0.0.1:{base}/api/feed" in banner
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{base}/api/feed") as r:
                assert r.status == 200
                assert r.headers["x-backend-system"] == "tiktok"
            async with s.post(f"http://127.0.0.1:{base}/api/payment/charge", data=b"{}") as r:
                assert r.status == 200
                assert r.headers["x-backend-system"] == "tokopedia"
            async with s.get(f"http://127.0.0.1:{base + 1821}/readyz") as r:
                assert r.status == 200
            # The simulated back ends moved with it (9001-9006 -> base+921 ... base+926).
            for port in range(9001, 9007):
                async with s.get(f"http://127.0.0.1:{base + port - 8080}/") as r:
                    assert r.status < 500, port
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


@pytest.mark.parametrize("base", ["65000", "0"])
def test_demo_port_base_out_of_range_is_refused(base: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--port-base", base],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=30,
    )
    assert done.returncode == 2
    assert "demo: --port-base:" in done.stderr
    assert "outside 1..65535" in done.stderr
