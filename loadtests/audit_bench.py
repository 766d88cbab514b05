"""What the tamper-evident audit trail costs, and how fast ``jalur audit verify`` reads it.

1. **Chaining per audited request, on and off.** The proxy's share of an audit record is
   ``AuditLog.record`` on the event loop (a queue put, the same with or without the chain)
   plus the writer thread's work: encode, link (SHA-256 of the previous line), write, and
   at each rotation a seal (HMAC) and a segment record. This writes ``--records`` records
   shaped like the proxy's through a real ``AuditLog`` (its thread, a real file, rotation at
   ``--max-bytes``), chained and not, interleaved ``--rounds`` times, and reports the medians
   of the process's CPU time per record (``time.process_time``: both threads) and of the
   loop-side ``record`` call alone (``time.thread_time`` of the calling thread).
2. **Verification speed.** Writes ``--verify-records`` chained records (rotating at the
   default 64 MiB) and times ``audit.verify`` on them: records per second, and what a day
   of records at ``--rate`` requests per second (default: ``make bench``'s jalur-1 rate
   for small requests, every request audited -- an upper bound, the benchmark's route is a
   promotion route that is not audited) would take.

    .venv/bin/python loadtests/audit_bench.py [--records 200000] [--rounds 3]
        [--verify-records 1000000] [--rate 6765]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import audit
from proxy import config as cfg
from proxy.compliance import AuditLog

KEY = "bench-audit-key-0123456789"


def record(i: int) -> dict[str, Any]:
    """A record as ``forward`` makes it for an allowed payment."""
    return {
        "request_id": f"5f0c7a8e-2b1d-4f7e-9a3c-{i:012x}",
        "route": "checkout",
        "category": "payment",
        "cluster": "tokopedia-pay",
        "system": "tokopedia",
        "status": 200,
        "duration": 0.004213,
        "decision": "allowed",
        "reason": None,
        "consent": None,
    }


def write(directory: Path, n: int, *, chained: bool, max_bytes: int) -> tuple[float, float]:
    """(CPU seconds of the process, CPU seconds of this thread in ``record``) for ``n``."""
    path = directory / "audit.log"
    conf = cfg.Audit(path=str(path), max_bytes=max_bytes, backups=100, queue_size=100_000)
    log = AuditLog(conf, KEY, chained=chained)
    log.start()
    entries = [record(i) for i in range(n)]
    cpu0, thread0 = time.process_time(), time.thread_time()
    for e in entries:
        log.record(e)
    thread1 = time.thread_time()
    log.close()
    cpu1 = time.process_time()
    assert log.written == n, (log.written, log.failed, log.dropped)
    for f in directory.iterdir():
        f.unlink()
    return cpu1 - cpu0, thread1 - thread0


def link_cost(n: int, *, chained: bool) -> float:
    """CPU seconds for the writer's encode (+ link) of ``n`` records, one thread, no I/O."""
    chain = audit.Chain(KEY.encode(), enabled=chained)
    entries = [{"time": "2026-12-06T03:50:00.123Z", **record(i)} for i in range(n)]
    started = time.process_time()
    for e in entries:
        chain.advance(chain.line(e))
    return time.process_time() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--verify-records", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=6765.0)
    args = p.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory(prefix="jalur-audit-bench-") as tmp:
        d = Path(tmp)
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for chained in (False, True):
                results[chained].append(write(d, n, chained=chained, max_bytes=args.max_bytes))
        print(f"## Chaining cost ({n:,} records per run, {args.rounds} rounds, medians)")
        print()
        print("| chain | CPU µs/record (both threads) | loop-side record() µs |")
        print("|---|---|---|")
        med: dict[bool, float] = {}
        for chained in (False, True):
            cpu = statistics.median(c for c, _ in results[chained]) / n * 1e6
            loop = statistics.median(t for _, t in results[chained]) / n * 1e6
            med[chained] = cpu
            print(f"| {'on' if chained else 'off'} | {cpu:.2f} | {loop:.2f} |")
        print()
        print(f"chaining adds {med[True] - med[False]:.2f} µs of CPU per audited request")
        print()
        links: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for chained in (False, True):
                links[chained].append(link_cost(n, chained=chained))
        off, on = (statistics.median(links[c]) / n * 1e6 for c in (False, True))
        print(
            f"encode alone (one thread, no I/O): {off:.2f} µs unchained, {on:.2f} µs chained: "
            f"the chain's own cost is {on - off:.2f} µs per record"
        )
        print()

        m = args.verify_records
        path = d / "audit.log"
        conf = cfg.Audit(path=str(path), queue_size=100_000)
        log = AuditLog(conf, KEY)
        log.start()
        for i in range(m):
            log.record(record(i))
        log.close()
        files = sorted(d.glob("audit.log*"))
        size = sum(f.stat().st_size for f in files)
        started = time.perf_counter()
        verdict = audit.verify(files, KEY.encode())
        took = time.perf_counter() - started
        assert verdict.intact, verdict.breaks[:3]
        rate = verdict.records / took
        day = args.rate * 86_400
        print(
            f"## Verification ({verdict.records:,} records, {len(files)} files, "
            f"{size / 2**20:.0f} MiB)"
        )
        print()
        print(f"audit.verify: {took:.1f} s, {rate:,.0f} records/s, {size / took / 2**20:.0f} MiB/s")
        print(
            f"a day at {args.rate:,.0f} audited req/s = {day / 1e6:,.0f} M records: "
            f"about {day / rate / 60:.0f} min to verify on one core"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
