"""Request ids: UUID-shaped, unique within a process, and not shared by forked workers."""

from __future__ import annotations

import os
import re
import uuid

from proxy.requestid import RequestIds, new_id

UUID4: re.Pattern[str] = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)


def test_ids_parse_as_version_4_uuids_and_do_not_repeat() -> None:
    ids = RequestIds()
    made = [ids() for _ in range(10_000)]
    assert len(set(made)) == len(made)
    for rid in made[:100]:
        assert UUID4.fullmatch(rid), rid
        assert uuid.UUID(rid).version == 4


def test_two_generators_draw_different_prefixes() -> None:
    assert RequestIds()()[:24] != RequestIds()()[:24]


def test_a_forked_child_draws_its_own_prefix() -> None:
    parent = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert UUID4.fullmatch(child)
    assert child[:24] != parent[:24]
