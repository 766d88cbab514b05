"""The tamper-evident audit trail: chain, seals, ``jalur audit verify``.

Trails are written by the real writer (``AuditLog``: its thread, rotation, restart) and
then tampered with the way someone holding the files but not the key could."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import audit, cli
from proxy import config as cfg
from proxy.compliance import AuditLog

from .test_compliance import entry as request_entry

KEY = "k" * 32
OTHER_KEY = "x" * 32


def entry(i: int) -> dict[str, Any]:
    return request_entry(i, pad="x" * 150)


def write(path: Path, first: int, n: int, key: str | None = KEY, **kw: Any) -> AuditLog:
    log = AuditLog(cfg.Audit(path=str(path), max_bytes=4096, backups=20, **kw), key)
    log.start()
    for i in range(first, first + n):
        log.record(entry(i))
    log.close()
    return log


def trail(tmp: Path) -> list[Path]:
    """Two runs of the writer (a restart) over several rotations; oldest file first."""
    path = tmp / "audit.log"
    write(path, 0, 60)
    write(path, 60, 40)
    return audit.order_paths(tmp.glob("audit.log*"))


def found(files: list[Path], key: str = KEY, **kw: Any) -> list[tuple[str, int, str]]:
    v = audit.verify(files, key.encode(), **kw)
    return [(Path(b.file).name, b.line, b.kind) for b in v.breaks]


def lines(f: Path) -> list[bytes]:
    return f.read_bytes().splitlines(keepends=True)


def request_line(f: Path, nth: int = 3) -> int:
    """0-based index of the ``nth`` request record of ``f``."""
    idx = [i for i, x in enumerate(lines(f)) if b'"request_id":"r' in x]
    return idx[nth]


def tamper(f: Path, change: Callable[[list[bytes], int], list[bytes]]) -> int:
    """Rewrite ``f`` as ``change(lines, i)`` makes it, ``i`` the index of its fourth
    request record; returns ``i``."""
    i = request_line(f)
    f.write_bytes(b"".join(change(lines(f), i)))
    return i


def test_an_intact_trail_over_rotations_and_a_restart_verifies(tmp_path: Path) -> None:
    files = trail(tmp_path)
    assert len(files) >= 5  # rotated several times
    v = audit.verify(files, KEY.encode(), keep=True)
    assert v.breaks == []
    assert v.intact
    assert v.chains == 2  # one per process start
    ids = [e["request_id"] for e in audit.iter_requests(v.entries)]
    assert ids == [f"r{i}" for i in range(100)]
    # Every file but the newest ends with a seal; every file begins a segment or a chain.
    for f in files:
        first, last = orjson.loads(lines(f)[0]), orjson.loads(lines(f)[-1])
        assert first["decision"] in ("start", "segment")
        assert last["decision"] == "seal"
        assert f.stat().st_size <= 4096  # the seal included
    # The restart continues the trail: the second chain's start links to the first's seal.
    records = [orjson.loads(x) for f in files for x in lines(f)]
    starts = [i for i, r in enumerate(records) if r["decision"] == "start"]
    assert len(starts) == 2
    second = records[starts[1]]
    before = records[starts[1] - 1]
    assert before["decision"] == "seal"
    assert second["after"] == {"chain": before["chain"], "seq": before["seq"]}
    assert second["prev"] == audit.digest(orjson.dumps(before))
    assert second["chain"] != before["chain"]


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    files = [str(f) for f in trail(tmp_path)]
    env = {"JALUR_AUDIT__KEY": KEY, "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "proxy", "audit", "verify", *files]
    ok = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact: 1" in ok.stdout
    nokey = subprocess.run(run, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert nokey.returncode == 2
    assert "JALUR_AUDIT__KEY" in nokey.stderr
    wrong = subprocess.run(
        run, env={**env, "JALUR_AUDIT__KEY": OTHER_KEY}, capture_output=True, text=True
    )
    assert wrong.returncode == 1
    assert "bad-seal" in wrong.stdout


@pytest.mark.parametrize("breaks_json", [False, True])
def test_one_byte_edited_is_found_at_that_record(tmp_path: Path, breaks_json: bool) -> None:
    files = trail(tmp_path)
    f = files[2]
    old, new = (b'"request_id"', b"\"request_id'") if breaks_json else (b":200", b":500")

    def edit(content: list[bytes], i: int) -> list[bytes]:
        content[i] = content[i].replace(old, new, 1)
        return content

    i = tamper(f, edit)
    assert found(files) == [(f.name, i + 1, "edited")]


def test_a_deleted_record_is_found_where_it_was(tmp_path: Path) -> None:
    files = trail(tmp_path)
    f = files[1]
    i = tamper(f, lambda content, i: content[:i] + content[i + 1 :])
    assert found(files) == [(f.name, i + 1, "missing")]  # the record now at its line


def test_two_swapped_records_are_found(tmp_path: Path) -> None:
    files = trail(tmp_path)
    f = files[3]
    i = tamper(f, lambda c, i: [*c[:i], c[i + 1], c[i], *c[i + 2 :]])
    assert found(files) == [(f.name, i + 2, "reordered")]


def test_a_file_cut_inside_a_record_is_truncated_there(tmp_path: Path) -> None:
    files = trail(tmp_path)
    f = files[2]
    i = tamper(f, lambda content, i: [*content[:i], content[i][:40]])
    # The cut file loses its seal too; the chain goes on in the next file.
    assert found(files) == [(f.name, i + 1, "truncated")]


def test_a_file_cut_at_a_line_boundary_is_truncated(tmp_path: Path) -> None:
    files = trail(tmp_path)
    f = files[2]
    i = tamper(f, lambda content, i: content[:i])
    assert found(files) == [(f.name, i, "truncated")]  # the last record left


def test_the_newest_file_cut_leaves_an_unsigned_tail(tmp_path: Path) -> None:
    files = trail(tmp_path)
    f = files[-1]
    content = lines(f)
    f.write_bytes(b"".join(content[:-3]))  # the seal and two records gone
    first_unsigned = next(
        n for n, x in enumerate(content, 1) if orjson.loads(x)["decision"] in ("segment", "start")
    )
    assert found(files) == [(f.name, first_unsigned, "unsigned-tail")]
    # A proxy still writing its file: accepted as live, with a note.
    v = audit.verify(files, KEY.encode(), live=True)
    assert v.intact
    assert any("not sealed yet" in w for w in v.warnings)


def test_a_file_without_its_head_is_truncated(tmp_path: Path) -> None:
    files = trail(tmp_path)
    f = files[1]
    f.write_bytes(b"".join(lines(f)[2:]))
    assert found(files)[0] == (files[0].name, len(lines(files[0])), "truncated")
    assert (f.name, 1, "truncated") in found(files)


def forge(f: Path, key: bytes) -> int:
    """Rewrite ``f``: change one record, rebuild every link from the segment's first
    record on (SHA-256 is public) and sign the seal with ``key``. Returns the seal's line."""
    records = [orjson.loads(x) for x in lines(f)]
    i = next(n for n, r in enumerate(records) if r["decision"] == "allowed")
    records[i]["status"] = 503
    out: list[bytes] = []
    prev = records[0]["prev"]
    for r in records:
        r["prev"] = prev
        if r["decision"] == "seal":
            r["mac"] = audit.seal_mac(key, r["chain"], r["segment_first"], r["seq"], prev)
        line = orjson.dumps(r)
        prev = audit.digest(line)
        out.append(line + b"\n")
    f.write_bytes(b"".join(out))
    return len(out)


def test_a_segment_replaced_by_one_signed_with_another_key(tmp_path: Path) -> None:
    files = trail(tmp_path)
    f = files[2]
    seal_line = forge(f, OTHER_KEY.encode())
    # Its links hold; its seal is not ours, and the next file's link points elsewhere.
    assert found(files) == [(f.name, seal_line, "bad-seal"), (f.name, seal_line, "edited")]


def test_the_last_file_replaced_and_resigned_is_found_by_its_seal(tmp_path: Path) -> None:
    files = trail(tmp_path)
    seal_line = forge(files[-1], OTHER_KEY.encode())
    assert found(files) == [(files[-1].name, seal_line, "bad-seal")]
    # The same forgery with the right key would pass: the key is what protects the trail.
    forge(files[-1], KEY.encode())
    assert found(files) == []


def test_an_edit_before_a_restart_is_found_through_the_restart_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, 0, 3)
    write(path, 3, 3)
    content = lines(path)
    # The first chain's closing seal: forge it (the MAC is recomputed with the right key, as
    # if an insider had it) -- only the next chain's start record still disagrees.
    i = next(n for n, x in enumerate(content) if b'"decision":"seal"' in x)
    seal = orjson.loads(content[i])
    seal["time"] = "2020-01-01T00:00:00.000Z"
    content[i] = orjson.dumps(seal) + b"\n"
    path.write_bytes(b"".join(content))
    assert found([path]) == [("audit.log", i + 2, "edited")]


def test_a_trail_written_without_a_key_does_not_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write(path, 0, 3, key=None)
    assert found([path]) == [("audit.log", 5, "bad-seal")]


def test_old_unchained_lines_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(orjson.dumps(entry(0)) + b"\n")
    write(path, 1, 2)
    assert found([path]) == [("audit.log", 1, "edited")]


def test_a_record_cannot_set_its_own_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(cfg.Audit(path=str(path)), KEY)
    log.start()
    log.record({**entry(0), "seq": 999, "chain": "evil", "prev": "0" * 64})
    log.close()
    assert found([path]) == []
    (record,) = [orjson.loads(x) for x in lines(path) if b'"r0"' in x]
    assert (record["seq"], record["chain"]) == (1, log._chain.id)


class HeldAuditLog(AuditLog):
    """Holds the writer inside its first request record until ``gate`` is set."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def _write(self, line: bytes) -> None:
        if b'"request_id":"r' in line and not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(10)
        super()._write(line)


def test_drops_are_recorded_in_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = HeldAuditLog(cfg.Audit(path=str(path), queue_size=2, on_overflow="drop"), KEY)
    log.start()
    log.record(entry(0))
    assert log.entered.wait(5)
    for i in range(1, 6):
        log.record(entry(i))
    log.gate.set()
    log.close()
    v = audit.verify([path], KEY.encode(), keep=True)
    assert v.intact, v.breaks
    (notice,) = [e for e in v.entries if e["decision"] == "dropped"]
    assert notice["count"] == 3
    assert isinstance(notice["seq"], int)
    assert notice["chain"] == log._chain.id


def test_a_torn_last_line_from_a_crash_is_reported_and_the_restart_links_past_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    write(path, 0, 3)
    whole = lines(path)
    path.write_bytes(b"".join(whole) + b'{"time":"2026')  # a crash inside a write
    write(path, 3, 2)
    v = audit.verify([path], KEY.encode())
    assert [(b.line, b.kind) for b in v.breaks] == [(len(whole) + 1, "edited")]


def test_the_key_comes_from_the_environment_only() -> None:
    conf = cfg.parse("{}", env={"JALUR_AUDIT__KEY": KEY})
    assert conf.audit.key == KEY
    with pytest.raises(cfg.ConfigError) as refused:
        cfg.parse(f"audit: {{key: {KEY}}}\n")
    (error,) = refused.value.errors
    assert error.path == "$.audit.key"
    assert "JALUR_AUDIT__KEY" in error.message
    assert error.line == 1
    with pytest.raises(cfg.ConfigError) as short:
        cfg.parse("{}", env={"JALUR_AUDIT__KEY": "short"})
    assert short.value.errors[0].path == "$.audit.key"


def test_a_live_file_verifies_with_live_only(tmp_path: Path) -> None:
    """A proxy still writing: records not sealed yet, the last one half written."""
    path = tmp_path / "audit.log"
    write(path, 0, 30)  # rotated and sealed
    log = AuditLog(cfg.Audit(path=str(path), max_bytes=4096, backups=20, flush_interval=0.05), KEY)
    log.start()
    try:
        log.record(entry(30))
        deadline = time.monotonic() + 5
        while b'"r30"' not in path.read_bytes():  # flushed within flush_interval
            assert time.monotonic() < deadline
            threading.Event().wait(0.01)
        files = audit.order_paths(tmp_path.glob("audit.log*"))
        with path.open("ab") as f:
            f.write(b'{"time":"2026-12-06T03:00:00.000Z","request_id":"r3')  # mid-write
        assert [k for _, _, k in found(files)] == ["truncated"]
        v = audit.verify(files, KEY.encode(), live=True)
        assert v.intact, v.breaks
        assert len(v.warnings) == 1
        ids = [e.get("request_id") for e in audit.records(files)]
        assert ids.count("r30") == 1
    finally:
        with path.open("ab") as f:
            f.write(b'"}\n')  # let the writer's own lines follow whole ones
        log.close()


@pytest.mark.parametrize("window", [audit.REORDER_WINDOW, 4])
def test_a_record_moved_far_is_missing_where_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Within the reorder window a moved record is only out of order; beyond it (memory is
    bounded), it is also missing at its place."""
    monkeypatch.setattr(audit, "REORDER_WINDOW", window)
    path = tmp_path / "audit.log"
    log = AuditLog(cfg.Audit(path=str(path)), KEY)
    log.start()
    for i in range(20):
        log.record(entry(i))
    log.close()
    content = lines(path)
    moved = content.pop(3)
    content.insert(len(content) - 1, moved)  # just before the seal
    path.write_bytes(b"".join(content))
    expected = [("audit.log", len(content) - 1, "reordered")]
    if window == 4:
        expected.insert(0, ("audit.log", 4, "missing"))
    assert found([path]) == expected


def test_check_says_whether_the_trail_will_be_sealed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "compliance: {audit: {path: /var/log/jalur/audit.log}}\n"
        "systems: {shop: {kind: commerce}}\n"
        "clusters: {pay: {system: shop, endpoints: ['http://127.0.0.1:9003']}}\n"
        "routes: [{name: pay, match: {prefix: /}, category: payment, to: pay}]\n"
    )
    monkeypatch.delenv("JALUR_AUDIT__KEY", raising=False)
    assert cli.main(["check", str(path)]) == 0
    assert "audit trail: /var/log/jalur/audit.log (NOT sealed: JALUR_AUDIT__KEY" in (
        capsys.readouterr().out
    )
    monkeypatch.setenv("JALUR_AUDIT__KEY", KEY)
    assert cli.main(["check", str(path)]) == 0
    assert "audit trail: /var/log/jalur/audit.log (sealed)" in capsys.readouterr().out
