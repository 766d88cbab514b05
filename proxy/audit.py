"""The tamper-evident audit trail: one hash chain per writing process, sealed segments.

Record format (one JSON object per line, written by :class:`proxy.compliance.AuditLog`'s
writer thread). Every record ends with three fields::

    "chain": "9f1c2a7e5b3d4c60"   random id of the writing process's chain (one per start)
    "seq":   41                    0 for the chain's ``start`` record, then +1 per record
    "prev":  "5e3b...c1"           SHA-256 (hex) of the exact bytes of the previous line
                                   of this chain (without its newline); null only on the
                                   very first record of a brand-new file

Control records (``decision``): ``start`` (a process began a chain: ``prev`` is the hash
of the last line the file held, ``after`` names that line's chain and seq, so a restart
continues the trail), ``segment`` (first line of a file after rotation), ``seal`` (last
line of a segment: a rotated file, or the file at a clean shutdown), ``dropped`` (the
queue was full: ``count`` records were refused; the gap is in the chain, not hidden),
``config`` (the migration inputs: category weights, routes, cluster kinds).

A seal holds ``mac`` = HMAC-SHA256 under ``audit.key`` (environment only:
``JALUR_AUDIT__KEY``) of ``chain``, ``segment_first`` (seq of the segment's first record),
its own ``seq`` and its ``prev`` -- the hash of the segment's last record, which through the
chain commits to every byte of the segment. Anyone can recompute the SHA-256 links after an
edit; nobody without the key can make the seal agree with them.

:func:`verify` reads the files oldest first (``x.3``, ``x.2``, ``x.1``, ``x``), groups the
records by chain and reports each break at its file and line: ``edited`` (a record's bytes
changed or do not parse), ``missing`` (seq numbers skipped), ``reordered`` (a record after
one with a higher seq), ``truncated`` (a file cut inside a line, or its tail or head cut
off), ``bad-seal`` (a seal not made with this key), ``unsigned-tail`` (records after the
last seal of a chain: a crash, a live file, or a tail cut at a line boundary).
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec
import orjson

from .accesslog import printable
from .config import Config
from .router import Target

__all__ = [
    "CONTROL",
    "KEY_ENV",
    "Break",
    "Chain",
    "Verdict",
    "config_record",
    "digest",
    "last_line",
    "order_paths",
    "per_worker",
    "records",
    "rfc3339",
    "seal_mac",
    "verify",
]

# The environment variable the seal key comes from (config path ``audit.key``).
KEY_ENV: Final = "JALUR_AUDIT__KEY"
# Decisions of the records the chain itself writes (not a request's decision).
CONTROL: Final = frozenset({"start", "segment", "seal", "config", "dropped"})
# Domain separation: a seal MAC can never be mistaken for another HMAC under the same key.
_SEAL_CONTEXT: Final = b"jalur-audit-seal-v1\x00"
# Bytes read back from the end of an existing file at start to find its last line; a line
# longer than this (never written by Jalur) starts a chain that does not link back.
_TAIL_BYTES: Final = 1 << 20
_ROTATED: Final = re.compile(r"^(?P<base>.*)\.(?P<n>\d+)$")


def digest(line: bytes) -> str:
    """The link to ``line``: SHA-256 hex of its bytes without the newline."""
    return hashlib.sha256(line).hexdigest()


def seal_mac(key: bytes, chain: str, first: int, seq: int, prev: str | None) -> str:
    msg = f"{chain}\x00{first}\x00{seq}\x00{prev or ''}".encode()
    return hmac.new(key, _SEAL_CONTEXT + msg, hashlib.sha256).hexdigest()


def rfc3339(epoch: float) -> str:
    """``2024-03-01T07:15:02.123Z`` (UTC, milliseconds, truncated)."""
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class Chain:
    """The writer's side of one chain (the writer thread only).

    ``line(out)`` appends the chain fields to ``out`` and encodes it; ``advance(line)`` is
    called once the line is written, so a record that failed to reach the file does not
    become a link. With ``enabled=False`` records are written unchained (to measure the
    cost of chaining; never in a deployment)."""

    __slots__ = ("enabled", "id", "key", "prev", "segment_first", "seq")

    def __init__(self, key: bytes | None, *, enabled: bool = True) -> None:
        self.key = key
        self.enabled = enabled
        self.id = secrets.token_hex(8)
        self.seq = -1  # of the last record written
        self.prev: str | None = None  # hash of the last record written
        self.segment_first = 0

    def line(self, out: dict[str, Any]) -> bytes:
        if self.enabled:
            out["chain"] = self.id
            out["seq"] = self.seq + 1
            out["prev"] = self.prev
        try:
            return orjson.dumps(out, default=repr, option=orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError:  # a request's bytes were not UTF-8: escape them
            return orjson.dumps(printable(out), default=repr, option=orjson.OPT_NON_STR_KEYS)

    def advance(self, line: bytes) -> None:
        if self.enabled:
            self.seq += 1
            self.prev = digest(line)

    def start(self, after: tuple[str | None, int | None, str] | None) -> dict[str, Any]:
        """The ``start`` record; ``after`` is (chain, seq, hash) of the file's last line."""
        out: dict[str, Any] = {"time": rfc3339(time.time()), "decision": "start"}
        out["pid"] = os.getpid()
        out["signed"] = self.key is not None
        if after is not None:
            self.prev = after[2]
            out["after"] = {"chain": after[0], "seq": after[1]}
        else:
            out["after"] = None
        return out

    def seal(self) -> dict[str, Any]:
        """The ``seal`` record closing the segment that began at ``segment_first``."""
        seq = self.seq + 1
        mac = None
        if self.key is not None:
            mac = seal_mac(self.key, self.id, self.segment_first, seq, self.prev)
        return {
            "time": rfc3339(time.time()),
            "decision": "seal",
            "segment_first": self.segment_first,
            "records": seq - self.segment_first,
            "mac": mac,
        }

    def segment(self) -> dict[str, Any]:
        """The ``segment`` record opening a new file after a rotation."""
        self.segment_first = self.seq + 1
        return {"time": rfc3339(time.time()), "decision": "segment"}


def config_record(
    config: Config, live: Mapping[str, Sequence[Target]] | None = None
) -> dict[str, Any]:
    """The ``config`` record: what a report needs to weigh the traffic that follows (the
    migration weights, each route's category and split, each cluster's system kind).
    ``live``: the splits as served (the fleet's live weights, which a reload may keep
    above the file's), by route."""
    kinds = {n: s.kind for n, s in config.systems.items()}
    comp = config.compliance
    routes: dict[str, Any] = {}
    for r in config.routes:
        served = (live or {}).get(r.name)
        if r.split and served:
            weights = {t.cluster: t.weight for t in served}
        elif r.split:
            weights = {t.cluster: t.weight for t in r.split}
        else:
            weights = {r.to: 1} if r.to is not None else {}
        routes[r.name] = {"category": r.category, "weights": weights}
    return {
        "decision": "config",
        "category_weights": dict(config.migration.weights),
        "transaction_categories": list(comp.transaction_categories),
        "transition_until": comp.transition_until.isoformat() if comp.transition_until else None,
        "legacy_clusters": list(comp.legacy_clusters),
        "clusters": {
            n: {"system": c.system, "kind": kinds.get(c.system)} for n, c in config.clusters.items()
        },
        "routes": routes,
    }


def per_worker(config: Config, slot: int) -> Config:
    """The config of worker ``slot`` under ``--workers N``: its own trail, ``PATH.wSLOT``
    (rotated as ``PATH.wSLOT.1`` ...). N processes appending to one file would interleave
    partial lines, and each rotating it would rename the others' files away. A restarted
    worker continues its slot's file (its ``start`` record links to the last line)."""
    spec = config.compliance.audit
    if spec.path == "-":
        return config
    spec = msgspec.structs.replace(spec, path=f"{spec.path}.w{slot}")
    compliance = msgspec.structs.replace(config.compliance, audit=spec)
    return msgspec.structs.replace(config, compliance=compliance)


def last_line(path: str) -> tuple[str | None, int | None, str] | None:
    """(chain, seq, hash) of the last complete line of ``path``, None when there is none.

    A file that does not end with a newline (a crash inside a write) gets one, so the
    torn line stays a line of its own (``verify`` reports it as truncated)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return None
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except FileNotFoundError:
        return None
    if not tail.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
        return None  # the last line is torn: link to nothing rather than to a fragment
    lines = tail[:-1].split(b"\n")
    if len(lines) < 2 and size > len(tail):
        return None  # a single line longer than the tail window
    line = lines[-1]
    chain: str | None = None
    seq: int | None = None
    try:
        obj = orjson.loads(line)
        if isinstance(obj, dict):
            c, s = obj.get("chain"), obj.get("seq")
            chain = c if isinstance(c, str) else None
            seq = s if isinstance(s, int) else None
    except orjson.JSONDecodeError:
        pass
    return chain, seq, digest(line)


# -- verification -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Break:
    file: str
    line: int  # 1-based line number in ``file``
    kind: str  # edited | missing | reordered | truncated | bad-seal | unsigned-tail
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.detail}"


@dataclass(slots=True)
class _Rec:
    file: int
    line: int
    seq: int
    prev: str | None
    hash: str
    chain: str
    decision: Any = None  # parsed only for the chain's own start, segment and seal records
    obj: dict[str, Any] | None = None


@dataclass
class Verdict:
    breaks: list[Break] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    records: int = 0
    chains: int = 0
    seals: int = 0
    # Every parsed record in reading order (only with ``keep=True``).
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.breaks


def order_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Oldest first: a rotated ``x.N`` before ``x.N-1`` ... before ``x``."""

    def key(p: Path) -> tuple[str, int]:
        m = _ROTATED.match(str(p))
        if m is not None:
            return m["base"], -int(m["n"])
        return str(p), 0

    return sorted((Path(p) for p in paths), key=key)


def verify(
    paths: Sequence[str | os.PathLike[str]],
    key: bytes,
    *,
    live: bool = False,
    keep: bool = False,
) -> Verdict:
    """Check every chain and seal in ``paths`` (any order; see :func:`order_paths`).

    ``live`` accepts an unsigned tail in the newest file (a proxy still writing it) as a
    warning. ``keep`` returns every parsed record in ``Verdict.entries``. Raises OSError
    when a file cannot be read.

    The cyclic garbage collector is paused meanwhile: a day of records is millions of small
    objects and no cycles, and its passes over them took a third of the time."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return _verify(paths, key, live=live, keep=keep)
    finally:
        if paused:
            gc.enable()


def _verify(
    paths: Sequence[str | os.PathLike[str]], key: bytes, *, live: bool, keep: bool
) -> Verdict:
    files = order_paths(paths)
    v = Verdict(files=[str(f) for f in files])
    check = _Checker(v, files, key)
    for fi, path in enumerate(files):
        name = str(path)
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            check.torn.add(fi)
            if live and fi == len(files) - 1:
                v.warnings.append(f"{name}:{len(lines)}: a record still being written (live)")
            else:
                v.breaks.append(
                    Break(name, len(lines), "truncated", "the file ends inside this record")
                )
        bad = check.bad_lines.setdefault(fi, set())
        first = True
        for n, raw in enumerate(lines, 1):
            if fi in check.torn and n == len(lines):
                bad.add(n)
                break
            rec = _parse(fi, n, raw, keep)
            if rec is None:
                bad.add(n)
                v.breaks.append(Break(name, n, "edited", "not a chained audit record"))
                continue
            if first and rec.decision not in ("start", "segment"):
                v.breaks.append(
                    Break(name, n, "truncated", "the file does not begin at a segment start")
                )
            first = False
            check.add(rec)
            v.records += 1
            if keep:
                assert rec.obj is not None
                v.entries.append(rec.obj)
    check.finish(live)
    v.chains = len(check.chains)
    v.breaks.sort(key=lambda b: (v.files.index(b.file), b.line, b.kind))
    return v


# The chain fields end every record (the writer appends them last): read from the line's
# end without parsing the rest. The SHA-256 link covers every byte, so a record edited
# elsewhere still breaks its link; only the chain's own records (their decision starts
# with "s": start, segment, seal) and records a report keeps are parsed whole.
_TAIL: Final = re.compile(
    rb',"chain":"([0-9a-f]{1,32})","seq":(0|[1-9][0-9]{0,17}),"prev":(?:"([0-9a-f]{64})"|null)\}\Z'
)
_TAIL_SPAN: Final = 200  # bytes from the end where _TAIL can begin
_OWN_RECORD: Final = b'"decision":"s'


def _parse(fi: int, n: int, raw: bytes, keep: bool) -> _Rec | None:
    h = hashlib.sha256(raw).hexdigest()
    if not keep and _OWN_RECORD not in raw:
        m = _TAIL.search(raw, max(0, len(raw) - _TAIL_SPAN))
        if m is not None:
            prev = m[3]
            return _Rec(fi, n, int(m[2]), prev.decode() if prev else None, h, m[1].decode())
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    chain, seq, prev = obj.get("chain"), obj.get("seq"), obj.get("prev")
    if not isinstance(chain, str) or not isinstance(seq, int) or isinstance(seq, bool):
        return None
    if prev is not None and not isinstance(prev, str):
        return None
    return _Rec(fi, n, seq, prev, h, chain, obj.get("decision"), obj)


# Records a chain keeps to check links and tell a reordering from a loss: a record that
# arrives more than this many seqs after its place counts as missing there and reordered
# where it is. Bounds verification's memory per chain, whatever the trail's length.
REORDER_WINDOW: Final = 4096


@dataclass(slots=True)
class _Gap:
    after: _Rec  # the record before the gap
    before: _Rec  # the record after it (the one that arrived first)
    first: int  # missing seqs: first..last, less those that arrived late
    last: int
    filled: int = 0


@dataclass
class _ChainState:
    recent: dict[int, _Rec] = field(default_factory=dict)  # seq -> record, in the window
    highest: _Rec | None = None
    gaps: list[_Gap] = field(default_factory=list)
    segment_first: int = 0
    seals: int = 0
    unsigned: _Rec | None = None  # the first record after the last seal
    unsigned_count: int = 0


class _Checker:
    """Checks records as they are read (oldest file first), keeping per chain only the
    last REORDER_WINDOW records: memory does not grow with the trail."""

    def __init__(self, v: Verdict, files: list[Path], key: bytes) -> None:
        self.v = v
        self.files = files
        self.key = key
        self.chains: dict[str, _ChainState] = {}
        self.bad_lines: dict[int, set[int]] = {}  # file -> lines that did not parse
        self.torn: set[int] = set()  # files that end inside a line

    def at(self, cid: str, r: _Rec, kind: str, detail: str) -> None:
        self.v.breaks.append(Break(str(self.files[r.file]), r.line, kind, f"chain {cid}: {detail}"))

    def add(self, r: _Rec) -> None:
        cid = r.chain
        c = self.chains.get(cid)
        if c is None:
            c = self.chains[cid] = _ChainState(segment_first=r.seq)
            if r.seq != 0:
                self.v.warnings.append(
                    f"chain {cid} begins at seq {r.seq} in {self.files[r.file]}: "
                    "its earlier records are not among the files given"
                )
        top = c.highest
        if r.seq in c.recent or (top is not None and r.seq <= top.seq - REORDER_WINDOW):
            assert top is not None
            self.at(cid, r, "reordered", f"seq {r.seq} repeats or comes far after its place")
            return
        if top is not None and r.seq < top.seq:
            self.at(cid, r, "reordered", f"seq {r.seq} comes after seq {top.seq} (line {top.line})")
            for gap in c.gaps:
                if gap.first <= r.seq <= gap.last:
                    gap.filled += 1
        elif top is not None and r.seq > top.seq + 1:
            c.gaps.append(_Gap(top, r, top.seq + 1, r.seq - 1))
        c.recent[r.seq] = r
        before, after = c.recent.get(r.seq - 1), c.recent.get(r.seq + 1)
        if before is not None and r.prev != before.hash:
            self.at(cid, before, "edited", f"seq {before.seq} does not hash to the link in "
                    f"seq {r.seq} (line {r.line})")  # fmt: skip
        if after is not None and after.prev != r.hash:
            self.at(cid, r, "edited", f"seq {r.seq} does not hash to the link in "
                    f"seq {after.seq} (line {after.line})")  # fmt: skip
        if top is None or r.seq > top.seq:
            c.highest = r
            self._evict(cid, c)
        if r.decision == "seal":
            self._seal(cid, c, r)
        elif r.decision == "segment":
            c.segment_first = r.seq
        elif r.decision == "start":
            self._start(cid, r)
        if r.decision != "seal":
            if c.unsigned is None:
                c.unsigned = r
            c.unsigned_count += 1

    def _seal(self, cid: str, c: _ChainState, r: _Rec) -> None:
        obj = _obj(r)
        mac, first = obj.get("mac"), obj.get("segment_first")
        c.seals += 1
        self.v.seals += 1
        c.unsigned, c.unsigned_count = None, 0
        expected, c.segment_first = c.segment_first, r.seq + 1
        if first != expected:
            self.at(
                cid, r, "edited", f"seal says its segment begins at seq {first}, not {expected}"
            )
        elif not isinstance(mac, str):
            self.at(cid, r, "bad-seal", "sealed without a key (set JALUR_AUDIT__KEY on the proxy)")
        elif not hmac.compare_digest(mac, seal_mac(self.key, cid, first, r.seq, r.prev)):
            self.at(cid, r, "bad-seal", "the seal was not made with this key")

    def _start(self, cid: str, r: _Rec) -> None:
        """A new process's chain links to the line the file ended with (when it is here)."""
        after = _obj(r).get("after")
        if r.prev is None or not isinstance(after, dict):
            return
        c = self.chains.get(after.get("chain"))  # type: ignore[arg-type]
        ref = c.recent.get(after.get("seq")) if c is not None else None  # type: ignore[arg-type]
        if ref is not None and ref.hash != r.prev:
            self.at(
                cid, r, "edited", f"the record it continues ({ref.chain} seq {ref.seq}) changed"
            )

    def _evict(self, cid: str, c: _ChainState) -> None:
        assert c.highest is not None
        floor = c.highest.seq - REORDER_WINDOW
        if len(c.recent) > 2 * REORDER_WINDOW:
            c.recent = {s: r for s, r in c.recent.items() if s > floor}
        while c.gaps and c.gaps[0].last <= floor:
            self._report_gap(cid, c.gaps.pop(0))

    def _report_gap(self, cid: str, gap: _Gap) -> None:
        a, b = gap.after, gap.before
        missing = gap.last - gap.first + 1 - gap.filled
        if missing <= 0:
            return
        if a.file == b.file:
            unparsed = sum(1 for n in self.bad_lines.get(a.file, ()) if a.line < n < b.line)
            if unparsed < missing:
                seqs = f"seq {gap.first}" + (f"..{gap.last}" if gap.last > gap.first else "")
                self.at(cid, b, "missing", f"{missing} record(s) before this one ({seqs})")
        elif a.file not in self.torn:
            self.v.breaks.append(
                Break(
                    str(self.files[a.file]),
                    a.line,
                    "truncated",
                    f"chain {cid}: the file ends after seq {a.seq}; {missing} record(s) up to "
                    f"seq {gap.last} are gone (the chain goes on in {self.files[b.file]})",
                )
            )

    def finish(self, live: bool) -> None:
        last_file = len(self.files) - 1
        for cid, c in self.chains.items():
            for gap in c.gaps:
                self._report_gap(cid, gap)
            first, top = c.unsigned, c.highest
            if first is None or top is None or top.file in self.torn:
                continue  # sealed, or the truncation is already reported
            if live and first.file == last_file:
                self.v.warnings.append(
                    f"chain {cid}: {c.unsigned_count} record(s) from "
                    f"{self.files[first.file]}:{first.line} are not sealed yet (live file)"
                )
            else:
                self.at(
                    cid, first, "unsigned-tail",
                    f"{c.unsigned_count} record(s) from here on are not sealed",
                )  # fmt: skip


def _obj(r: _Rec) -> dict[str, Any]:
    assert r.obj is not None  # the chain's own records are always parsed
    return r.obj


def records(paths: Sequence[str | os.PathLike[str]]) -> Iterator[dict[str, Any]]:
    """Every record of a verified trail, oldest file first, one file in memory at a time."""
    for path in order_paths(paths):
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]  # a line still being written (``live``)
        for line in data.splitlines():
            obj = orjson.loads(line)
            if isinstance(obj, dict):
                yield obj


def iter_requests(entries: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The records of requests (not the chain's own records)."""
    for e in entries:
        if e.get("decision") not in CONTROL:
            yield e
