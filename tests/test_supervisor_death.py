"""`jalur run --workers N` as an operator meets it when things go wrong (issue #19): workers
end with their supervisor, whatever killed it; no metrics folder is left in the temp
directory; a busy port is one line and exit 1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import SERVING, SYSTEMS, Harness, children, free_port, until


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its new parent to reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def write_config(tmp: Path, backend: str, **listen: Any) -> Path:
    conf = {
        "listen": {"host": "127.0.0.1", "port": 0, **listen},
        "admin": {"host": "127.0.0.1", "port": 0},
        "drain": {"delay": 0, "timeout": 5},
        "access_log": {"enabled": False},
        "systems": SYSTEMS,
        "clusters": {"pay": {"system": "tokopedia", "endpoints": [backend]}},
        # The process lifecycle under test needs no shared store: the payment gate is off
        # (with it on, --workers 2 would rightly refuse the per-process memory store).
        "routes": [
            {
                "name": "pay",
                "match": {},
                "category": "payment",
                "to": "pay",
                "idempotency": {"enabled": False},
            }
        ],
        "compliance": {"audit": {"path": str(tmp / "audit.log")}},
    }
    path = tmp / "jalur.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def env_with_tmp(tmp: Path) -> dict[str, str]:
    tmpdir = tmp / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}


async def start(path: Path, env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path), *args,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while not SERVING.search(line := (await proc.stderr.readline()).decode()):
            assert line, "jalur exited before serving"
    return proc


@pytest.mark.slow
async def test_workers_exit_when_the_supervisor_is_killed(harness: Harness, tmp_path: Path) -> None:
    b = await harness.backend("pay", "tokopedia")
    env = env_with_tmp(tmp_path)
    proc = await start(write_config(tmp_path, b.url), env, "--workers", "2")
    workers = children(proc.pid)
    assert len(workers) == 2
    assert next((tmp_path / "tmp").iterdir()).name.startswith("jalur-metrics-")
    proc.kill()  # SIGKILL: the supervisor cannot clean up or signal anyone
    # (not ``proc.wait()`` first: it waits for the stderr pipe the workers also hold)
    try:
        await until(lambda: all(gone(w) for w in workers), within=10)
        try:
            await until(lambda: not list((tmp_path / "tmp").iterdir()), within=20)
        except AssertionError:
            left = [str(p) for p in (tmp_path / "tmp").rglob("*")]
            raise AssertionError(f"left in the temp directory: {left}") from None
    finally:
        for w in workers:  # orphans left by a failure: stopped by their pid
            if not gone(w):
                os.kill(w, signal.SIGKILL)
        await proc.wait()


@pytest.mark.slow
async def test_a_stopped_supervisor_leaves_no_metrics_folder(
    harness: Harness, tmp_path: Path
) -> None:
    b = await harness.backend("pay", "tokopedia")
    env = env_with_tmp(tmp_path)
    proc = await start(write_config(tmp_path, b.url), env, "--workers", "2")
    assert list((tmp_path / "tmp").iterdir())
    proc.send_signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert not list((tmp_path / "tmp").iterdir())


def test_the_watchdog_notices_a_parent_that_died(tmp_path: Path) -> None:
    """The fallback without a parent-death signal: a real child process whose parent
    exits sees its parent pid change and stops."""
    flag = tmp_path / "orphaned"
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from proxy import parentwatch
        parent = os.getpid()
        if os.fork() == 0:
            asyncio.run(parentwatch.watch_parent(
                parent, lambda: open({str(flag)!r}, "w").close(), interval=0.05))
            os._exit(0)
        print("forked", flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=True
    )
    assert out.stdout.strip() == "forked"
    asyncio.run(until(flag.exists, within=10))


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("which", ["listen", "admin"])
async def test_a_busy_port_is_one_line_and_exit_1(tmp_path: Path, workers: str, which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = write_config(tmp_path, f"http://127.0.0.1:{free_port()}")
        conf = yaml.safe_load(path.read_text())
        conf[which]["port"] = port
        path.write_text(yaml.safe_dump(conf))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(path), "--workers", workers,
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            # A sealed trail, as in production: no warning about an unsealed one either.
            env={**env_with_tmp(tmp_path), "JALUR_AUDIT__KEY": "busy-port-test-key-0123"},
        )  # fmt: skip
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    assert proc.returncode == 1
    assert err.decode().strip() == f"{which} 127.0.0.1:{port}: address already in use"
    assert not list((tmp_path / "tmp").iterdir())
