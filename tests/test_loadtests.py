"""Smoke runs of the load tests and the benchmark, so they cannot rot.

* ``loadtests/run.py`` (what ``make loadtest`` runs) for a few seconds against ``jalur demo`` on
  free ports, with the migration shape ramping the demo's split through the admin API: every
  route is exercised, nothing fails, the ramp reached 100 %.
* The locustfile's rule that a transaction answered by a social system is a failure: Locust
  aimed straight at a social back end (no proxy) must report those failures.
* ``loadtests/soak.py`` (what ``make soak`` runs) for 6 s with one back-end restart and 5 %
  resets: it attributes every failure to an injected fault and reports its figures.
* ``loadtests/bench.py --smoke --before HEAD`` (what ``make bench BENCH_BEFORE=HEAD`` runs,
  1 s per cell): it produces the results table, with the two feature-less floor proxies of
  ``loadtests/floor.py``, jalur-before beside jalur-1 and the memory tables. It needs
  ``wrk`` (skipped without it); without ``nginx`` the NGINX contender is skipped and the
  report says so. ``make test`` installs both (Debian packages).
"""

from __future__ import annotations

import asyncio
import csv
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import Harness, free_port

ROOT = Path(__file__).resolve().parent.parent
LOADTESTS = ROOT / "loadtests"
ROUTES = {"feed", "live", "products", "cart", "checkout", "payment", "orders"}
HAVE_NGINX = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


async def run(*cmd: str, limit: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` to completion (killed after ``limit`` s); exit code and combined output."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        async with asyncio.timeout(limit):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode("utf-8", "replace")


def stats(path: Path) -> dict[str, dict[str, str]]:
    """Locust's ``*_stats.csv`` rows by name (the aggregate row is ``Aggregated``)."""
    with path.open() as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


async def test_loadtest_smoke_with_migration_ramp_has_no_failures(tmp_path: Path) -> None:
    code, out = await run(
        sys.executable,
        str(LOADTESTS / "run.py"),
        "--free-ports",
        "--time",
        "5s",
        "--users",
        "10",
        "--spawn-rate",
        "10",
        "--shape",
        "migration",
        "--reports",
        str(tmp_path),
        limit=90,
    )
    assert code == 0, out
    rows = stats(tmp_path / "loadtest_stats.csv")
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0, out
    assert int(total["Failure Count"]) == 0, out
    assert set(rows) >= ROUTES, f"routes not exercised: {ROUTES - set(rows)}\n{out}"
    # The ramp's admin calls are in the stats too (and none failed: the aggregate above).
    admin = {name.rsplit(" ", 1)[-1] for name, row in rows.items() if row["Type"] == "ADMIN"}
    # Only forward from the demo's live 87 %: halfway to 100, then 100 (issue #17).
    assert admin == {"93%", "100%"}, out
    migration = json.loads((tmp_path / "migration.json").read_text())
    assert migration["samples"], migration
    weights = [s["weight_percent"] for s in migration["samples"]]
    assert min(weights) >= 87, migration
    assert weights == sorted(weights), f"the ramp moved shoppers back: {weights}"
    assert "total:" in (tmp_path / "summary.txt").read_text()
    assert (tmp_path / "loadtest.html").stat().st_size > 0


async def test_make_loadtest_passes_args_to_run_py_and_locust(tmp_path: Path) -> None:
    """`make loadtest ARGS=...`: run.py's own options override the Makefile's defaults and a
    Locust option (--tags) reaches Locust: only the tagged task runs."""
    code, out = await run(
        "make",
        "--no-print-directory",
        "loadtest",
        "ARGS=--free-ports --time 4s --users 4 --spawn-rate 4 --shape none --proxy-workers 1 "
        f"--reports {tmp_path} --tags feed",
        limit=120,
    )
    assert code == 0, out
    rows = stats(tmp_path / "loadtest_stats.csv")
    assert int(rows["Aggregated"]["Request Count"]) > 0, out
    assert set(rows) == {"feed", "Aggregated"}, out
    assert not (tmp_path / "migration.json").exists()  # --shape none won over migration


async def test_soak_smoke_with_a_restart_and_resets(tmp_path: Path) -> None:
    summary = tmp_path / "soak.txt"
    code, out = await run(
        sys.executable, str(LOADTESTS / "soak.py"), "--time", "6s", "--restart-every", "3",
        "--users", "5", "--spawn-rate", "5", "--reset-rate", "0.05",
        "--reports", str(tmp_path / "soak"), "--summary", str(summary),
        limit=90,
    )  # fmt: skip
    assert code == 0, out
    text = summary.read_text()
    assert ", 1 restarts (" in text, text
    assert "NOT BACK" not in text, text
    assert "MISS" not in text, text
    injected = re.search(r"injected: (\d+) connection resets at the back ends", text)
    assert injected, text
    journals = list((tmp_path / "soak").glob("journal-*.jsonl"))
    resets = sum(
        b'"event":"reset"' in line for j in journals for line in j.read_bytes().splitlines()
    )
    # /_sim/faults (accumulated before each stop) sees every reset the journals have, but
    # for a health check reset between the last read and the end.
    assert 0 < int(injected.group(1)) <= resets
    for figure in ("requests:", "payments executed twice: 0 per back end",
                   "payments served by a social system: 0", "jalur RSS: start",
                   "jalur_retries_total by route:"):  # fmt: skip
        assert figure in text, text


async def test_transaction_answered_by_social_system_is_a_locust_failure(
    harness: Harness, tmp_path: Path
) -> None:
    social = await harness.backend("shop-legacy", "tiktok")
    # No admin listener to read rules from: the strict default (tiktok serves no transaction).
    env = {
        "JALUR_LOADTEST_ADMIN_URL": f"http://127.0.0.1:{free_port()}",
        "JALUR_LOADTEST_SHAPE": "",
    }
    code, out = await run(
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOADTESTS / "locustfile.py"),
        "--headless",
        "-u",
        "10",
        "-r",
        "10",
        "-t",
        "3s",
        "--host",
        social.url,
        "--csv",
        str(tmp_path / "neg"),
        "--only-summary",
        limit=60,
        env=env,
    )
    assert code != 0, out
    rows = stats(tmp_path / "neg_stats.csv")
    for route in ("feed", "live", "products"):
        if route in rows:
            assert rows[route]["Failure Count"] == "0", rows[route]
    failed = {n for n, r in rows.items() if n != "Aggregated" and int(r["Failure Count"]) > 0}
    assert failed, out
    assert failed <= {"cart", "checkout", "payment", "payment-retry", "orders"}, failed
    for route in failed:
        assert rows[route]["Failure Count"] == rows[route]["Request Count"], rows[route]
    errors = (tmp_path / "neg_failures.csv").read_text()
    assert "transaction served by social system tiktok" in errors, errors


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not on PATH (Debian package 'wrk'; make test and make bench install it)",
)
async def test_bench_smoke_writes_a_results_table(tmp_path: Path) -> None:
    out_file = tmp_path / "RESULTS.md"
    bench = str(LOADTESTS / "bench.py")
    code, out = await run(
        sys.executable, bench, "--smoke", "--before", "HEAD", "--out", str(out_file), limit=150
    )
    assert code == 0, out
    text = out_file.read_text()
    assert "<!-- bench:begin -->" in text
    assert "<!-- bench:end -->" in text
    assert "| conns | size | contender | req/s |" in text
    expected = ["direct", "jalur-1", "jalur-2", "floor-bare", "floor-aiohttp"]
    expected += ["nginx"] if HAVE_NGINX else []
    for name in expected:
        assert f"| 50 | small | {name} |" in text, text
        assert f"| 50 | 64k | {name} |" in text, text
    if not HAVE_NGINX:
        assert "**Skipped:** NGINX" in text
    # The two feature-less proxies relayed the same bytes (bench checks every contender's
    # answers before measuring) and the CPU split table has a row per cell.
    assert "Where Jalur's CPU per request goes" in text
    assert re.search(
        r"^\| 50 \| small \| (\d+|-) \| \d+ \| \d+ \| \d+ \| [+-]\d+ \|", text, re.M
    ), text
    # jalur-before: HEAD's proxy/ from `git archive`, imported from there (not from the
    # editable install), measured in the same rounds and reported beside jalur-1.
    imported = re.search(r"jalur-before imports proxy from (\S+)", out)
    assert imported, out
    assert imported.group(1).endswith("/before/proxy/__init__.py"), out
    assert not imported.group(1).startswith(str(ROOT)), out
    assert "| 50 | small | jalur-before |" in text, text
    assert "Before / after in the same interleaved run" in text, text
    assert re.search(r"^\| 50 \| small \| [\d,]+ \| [\d,]+ \| [\d.]+ \|", text, re.M), text
    # Memory on fresh processes: idle connections (jalur-1, jalur-before and NGINX) and the
    # streams up and down through both Jalur builds.
    assert re.search(r"^\| jalur-1 \| [\d.]+ MiB \| [\d.]+ MiB \|", text, re.M), text
    assert re.search(r"^\| jalur-before \| [\d.]+ MiB \| [\d.]+ MiB \|", text, re.M), text
    for name in ("jalur-1", "jalur-before"):
        for direction in ("upload", "download"):
            assert re.search(rf"^\| {name} \| {direction} \| [\d,]+ \| ", text, re.M), text
    assert "- python: " in text
    assert "- kernel: " in text


async def test_bench_refuses_a_before_tree_proxy_does_not_import_from(tmp_path: Path) -> None:
    """The check behind jalur-before: with a tree that has no ``proxy`` package, ``import
    proxy`` finds the editable install instead, and bench.py stops rather than measuring it."""
    empty = tmp_path / "before"
    empty.mkdir()
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import bench; "
        "bench.check_imports_from(Path(sys.argv[2]), Path(sys.argv[2]))"
    )
    status, out = await run(sys.executable, "-c", code, str(LOADTESTS), str(empty), limit=60)
    assert status == 1, out
    assert "jalur-before would not run the tree asked for" in out, out
    assert str(ROOT / "proxy" / "__init__.py") in out, out


def test_profile_summary_charges_own_time_to_jalur_listener_and_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``make profile``'s summary: a standard-library or metrics-library frame is charged to
    the Jalur function that called it, aiohttp's frames to the listener, ``Runner.run``'s
    own samples to the event loop, and other threads are left out."""
    monkeypatch.syspath_prepend(str(LOADTESTS))
    bench = importlib.import_module("bench")  # loadtests/bench.py (not a package)

    base = "<module> (jalur:8);main (proxy/cli.py:10);_run (proxy/cli.py:20)"
    base += ";run (uvloop/__init__.py:105);Runner.run (asyncio/runners.py:118)"
    handler = ";RequestHandler._handle_request (aiohttp/web_protocol.py:500)"
    handler += ";Forwarder.handle (proxy/forward.py:543)"
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "\n".join(
            [
                f"{base} 30",  # the loop's own
                f"{base};RequestHandler.start (aiohttp/web_protocol.py:686) 20",
                f"{base}{handler};RouteMetrics.observe (proxy/metrics.py:280)"
                ";MutexValue.inc (prometheus_client/values.py:28) 15",
                f"{base}{handler};_new_id (proxy/tracing.py:68);getrandbits (random.py:1) 5",
                f"{base}{handler};StreamWriter._writelines (aiohttp/http_writer.py:116) 25",
                f"{base}{handler} 5",
                "Thread._bootstrap (threading.py:1002);AuditLog._run (proxy/compliance.py:767)"
                ";Condition.wait (threading.py:327) 500",
            ]
        )
        + "\n"
    )
    text = bench.summarize_profile(raw, "synthetic")
    assert "100 samples of the event-loop thread (500 of other threads" in text, text
    assert "| jalur | 25.0 % |" in text, text
    assert "| aiohttp listener | 45.0 % |" in text, text
    assert "| event loop | 30.0 % |" in text, text
    assert "| `proxy/metrics.py` | 15.0 % | 15.0 % |" in text, text
    assert "| `proxy/forward.py` | 5.0 % | 50.0 % |" in text, text
    assert "| `RouteMetrics.observe (proxy/metrics.py)` | 15.0 % |" in text, text
    assert "| `_new_id (proxy/tracing.py)` | 5.0 % |" in text, text
    assert "_run (proxy/cli.py)` |" not in text.split("Top 20 Jalur functions")[1].split("Top")[0]


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not on PATH (Debian package 'wrk'; make test and make bench install it)",
)
async def test_cprofile_counts_calls_per_request_of_jalur_functions() -> None:
    """``make profile ARGS=--cprofile`` at 1 s: jalur run under cProfile exits on SIGTERM with
    its stats written, and the summary counts Jalur's handler about once per request."""
    code, out = await run(
        sys.executable,
        str(LOADTESTS / "bench.py"),
        "--profile",
        "--cprofile",
        *("--duration", "1", "--warmup", "0", "--conns", "10", "--sizes", "small"),
        limit=90,
    )
    assert code == 0, out
    requests = re.search(r"### cProfile of jalur-1: ([\d,]+) requests", out)
    assert requests, out
    assert int(requests.group(1).replace(",", "")) > 100, out
    # headers.upstream_headers runs once per request: ~1.00 calls per request.
    row = re.search(r"^\| `upstream_headers \(proxy/headers\.py\)` \| ([\d.]+) \|", out, re.M)
    assert row, out
    assert 0.9 <= float(row.group(1)) <= 1.1, out
    stats = re.search(r"Stats: `(\S+\.prof)`", out)
    assert stats, out
    written = LOADTESTS / "reports" / Path(stats.group(1)).name
    assert written.is_file(), out
    written.unlink()
