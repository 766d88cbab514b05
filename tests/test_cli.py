"""The command line as a new user meets it: --help of every command, `jalur version`,
`jalur demo --port-base`."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy import __version__, cli

from .conftest import demo_on_port_base


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


async def test_demo_port_base_moves_every_port_together(tmp_path: Path) -> None:
    async with demo_on_port_base(tmp_path) as (base, admin), aiohttp.ClientSession() as s:
        assert admin == base + 1821
        async with s.get(f"http://127.0.0.1:{base}/api/feed") as r:
            assert r.status == 200
            assert r.headers["x-backend-system"] == "tiktok"
        async with s.post(f"http://127.0.0.1:{base}/api/payment/charge", data=b"{}") as r:
            assert r.status == 200
            assert r.headers["x-backend-system"] == "tokopedia"
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
            assert r.status == 200
        # The simulated back ends moved with it (9001-9006 -> base+921 ... base+926).
        for port in range(9001, 9007):
            async with s.get(f"http://127.0.0.1:{base + port - 8080}/") as r:
                assert r.status < 500, port


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
