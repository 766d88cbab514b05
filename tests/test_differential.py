"""Differential tests: real back ends of other stacks behind Jalur, each saying what IT read.

PHP (``php -S``: ``$_COOKIE``, ``$_SERVER``), Java (``com.sun.net.httpserver``,
``equalsIgnoreCase``, ``Long.parseLong``), Node (``http`` and the npm ``cookie`` package),
Go (``net/http``) and Python (aiohttp's ``request.cookies``) each run twice, as the social
and as the commerce system, behind a Jalur proxy (the routes of tests/test_crossing.py). A
generator feeds every family of issue #18 (paths, cookies, header names, Set-Cookie, Host)
with many spellings; each back end answers with its own reading (route, id, cookies,
headers), and the tests assert that

- no back end reads another system's cookie or header under any spelling (as that stack
  names what it read),
- a cookie a back end planted through Set-Cookie is never read by the other system,
- no transaction reading (payment, orders, cart, the payment host) ever reaches social.

The back ends are built once per session into a cache (``JALUR_TEST_CACHE``, default
``~/.cache/jalur-tests``): javac output and the Go binary keyed by a hash of their source,
the npm ``cookie`` package installed there from the npm registry. ``make test-tools``
installs php-cli, default-jdk-headless, nodejs, npm and golang when missing.
``JALUR_DIFF_EXAMPLES`` sets the generated cases per family and stack (``make fuzz``: many).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.server import ProxyServer

from .conftest import Harness, RawResponse, free_port, raw_request
from .test_crossing import BOUNDARY, PAY_HOST, request, start

STACKS_DIR: Path = Path(__file__).parent / "stacks"
CACHE = Path(os.environ.get("JALUR_TEST_CACHE", Path.home() / ".cache" / "jalur-tests"))
EXAMPLES = int(os.environ.get("JALUR_DIFF_EXAMPLES", "40"))
NODE_COOKIE = "cookie@0.7.2"  # the version Express 4 depends on
STACKS = ("php", "java", "node", "go", "python")
SYSTEMS = ("social", "commerce")
# Owned names as tests/conftest.py's SYSTEMS (and the consent-gated identity) define them.
COOKIE_OF = {"social": "tt_session", "commerce": "_SID_Tokopedia_"}
HEADERS_OF = {"social": ("x-tt-user", "x-social-user-id"), "commerce": ("authorization",)}
OTHER = {"social": "commerce", "commerce": "social"}
PATH_OF = {"social": "/feed", "commerce": "/api/payment/charge"}
TRANSACTION_READINGS = frozenset({"payment", "orders", "cart", "pay-host"})
STARTUP = 60.0  # seconds a back end may take to say it is ready (a cold JVM on a busy box)


# -- building and starting the back ends -----------------------------------------------------


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed: run `make test-tools`")
    return found


def _run(argv: list[str], **kw: Any) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")


def _java() -> Callable[[str], tuple[list[str], dict[str, str]]]:
    javac, java = _need("javac"), _need("java")
    source = STACKS_DIR / "Backend.java"
    out = CACHE / f"java-{_digest(source)}"
    if not (out / "Backend.class").exists():
        _run([javac, "-d", str(out), str(source)])
    return lambda system: ([java, "-Xshare:auto", "-cp", str(out), "Backend", system], {})


def _go() -> Callable[[str], tuple[list[str], dict[str, str]]]:
    go = _need("go")
    source = STACKS_DIR / "backend.go"
    binary = CACHE / f"go-{_digest(source)}" / "backend"
    if not binary.exists():
        env = {
            **os.environ,
            "GOCACHE": str(CACHE / "go-build"),
            "GOPATH": str(CACHE / "gopath"),
            "GOFLAGS": "-mod=mod",
            "GO111MODULE": "off",
        }
        _run([go, "build", "-o", str(binary), str(source)], env=env)
    return lambda system: ([str(binary), system], {})


def _node() -> Callable[[str], tuple[list[str], dict[str, str]]]:
    node, npm = _need("node"), _need("npm")
    prefix = CACHE / "node"
    if not (prefix / "node_modules" / "cookie" / "package.json").exists():
        prefix.mkdir(parents=True, exist_ok=True)
        _run(
            [
                npm,
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(prefix),
                NODE_COOKIE,
            ]
        )
    env = {"NODE_PATH": str(prefix / "node_modules")}
    return lambda system: ([node, str(STACKS_DIR / "backend.js"), system], env)


def _php() -> Callable[[str], tuple[list[str], dict[str, str]]]:
    php = _need("php")
    router = str(STACKS_DIR / "backend.php")
    # php -S cannot report a port it chose: the port is picked here (see _listening).
    return lambda system: ([php, "-S", "127.0.0.1:{port}", router], {"JALUR_SYSTEM": system})


def _python() -> Callable[[str], tuple[list[str], dict[str, str]]]:
    script = str(STACKS_DIR / "backend_aiohttp.py")
    return lambda system: ([sys.executable, script, system], {})


BUILDERS = {"php": _php, "java": _java, "node": _node, "go": _go, "python": _python}


@dataclass
class Backend:
    stack: str
    system: str
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _ready_port(proc: subprocess.Popen[bytes]) -> int:
    """The port from the back end's first stdout line, ``ready PORT``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(STARTUP):
            raise RuntimeError("back end did not say it was ready")
    line = proc.stdout.readline().decode()
    if not line.startswith("ready "):
        raise RuntimeError(f"back end said {line!r}")
    return int(line.split()[1])


def _listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"back end exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)  # polling for a port with a deadline: no event to wait on
    raise RuntimeError("back end is not listening")


def _launch(
    stack: str, system: str, command: Callable[[str], tuple[list[str], dict[str, str]]]
) -> Backend:
    argv, env = command(system)
    port = 0
    if any("{port}" in a for a in argv):
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in argv]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=STACKS_DIR,
    )
    try:
        if port:
            _listening(port, proc)
        else:
            port = _ready_port(proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return Backend(stack, system, proc, port)


@pytest.fixture(scope="session")
def stacks() -> Iterator[dict[str, dict[str, Backend]]]:
    """Every stack running as social and as commerce, built and started once per session."""
    CACHE.mkdir(parents=True, exist_ok=True)
    started: dict[str, dict[str, Backend]] = {}
    try:
        for stack in STACKS:
            command = BUILDERS[stack]()
            started[stack] = {system: _launch(stack, system, command) for system in SYSTEMS}
        yield started
    finally:
        for by_system in started.values():
            for b in by_system.values():
                b.proc.terminate()
        for by_system in started.values():
            for b in by_system.values():
                try:
                    b.proc.wait(10)
                except subprocess.TimeoutExpired:
                    b.proc.kill()
                    b.proc.wait()


# -- the generator ------------------------------------------------------------------------------

# Letters some stack case-maps onto ASCII (Java's equalsIgnoreCase, Turkish locales), UTF-8.
LOOKALIKES = {"i": ["%C4%B1", "%C4%B0"], "s": ["%C5%BF"], "k": ["%E2%84%AA"]}
# "1" in scripts whose digits Long.parseLong / int() take, and Unicode forms NFKC folds.
ONES = ["1", "%D9%A1", "%DB%B1", "%E0%A5%A7", "%EF%BC%91", "%E0%A7%A7", "%E1%A0%91"]
SUFFIXES = ["", ".json", ".xml", ".php", ".JSON", "/", "/items", "/1", ";x", "%20"]
SEPARATORS = ["; ", ";", " ", ",", "\t", ", ", " ;", ";\t", ",\t", " , "]


def _case(rng: random.Random, s: str) -> str:
    return "".join(c.swapcase() if rng.random() < 0.4 else c for c in s)


def _lookalike(rng: random.Random, s: str) -> str:
    out = []
    for c in s:
        options = LOOKALIKES.get(c.lower())
        out.append(rng.choice(options) if options and rng.random() < 0.5 else c)
    return "".join(out)


def paths(rng: random.Random, n: int) -> list[str]:
    """Spellings of the transaction paths (/api/payment, /api/orders/ID, /api/cart)."""
    out = []
    for _ in range(n):
        api = _lookalike(rng, _case(rng, "api"))
        kind = rng.choice(["payment", "orders", "cart"])
        word = _lookalike(rng, _case(rng, kind))
        if kind == "orders":
            one = rng.choice(ONES)
            number = rng.choice(["", "+", "0", "00", "-0" if one == "1" else "+"]) + one
            word += "/" + number + rng.choice(["", "abc", " ", "e0"] if one == "1" else [""])
            word = word.replace(" ", "%20")
        slash = rng.choice(["/", "//", "/./", "/x/../"])
        out.append(f"/{api}{slash}{word}{rng.choice(SUFFIXES)}")
    return out


def cookie_names(rng: random.Random, owned: str) -> str:
    """A name some stack may read as ``owned``."""
    i = owned.index("_", 1)
    inner = rng.choice(["_", "_", "_", ".", "[", " ", "%5F", "%2E", "+"])
    name = owned[:i] + inner + owned[i + 1 :]
    name = _case(rng, name) if rng.random() < 0.5 else name
    prefix = rng.choice(["", "", " ", "\t"])
    return prefix + name + rng.choice(["", "", "", " ", "[x]", "]", "[", "%00"])


def cookie_headers(rng: random.Random, owned: str, secret: str, n: int) -> list[list[str]]:
    """Cookie header lines carrying ``secret`` under a spelling of ``owned``."""
    out = []
    for _ in range(n):
        pairs = [f"n{j}=v{j}" for j in range(rng.randint(0, 3))]
        forged = f"{cookie_names(rng, owned)}={secret}"
        if rng.random() < 0.2:
            forged = f'a="{rng.choice(["1 ", ""])}{forged}"'
        if rng.random() < 0.1:
            forged = f"{owned}{secret}"  # a bare value
        pairs.insert(rng.randint(0, len(pairs)), forged)
        text = pairs[0]
        for pair in pairs[1:]:
            text += rng.choice(SEPARATORS) + pair
        lines = [text]
        if rng.random() < 0.2:
            lines.append(f"z=1{rng.choice(SEPARATORS)}{forged}")
        out.append(lines)
    return out


def header_names(rng: random.Random, owned: str, n: int) -> list[str]:
    """Header names some stack may read as ``owned`` (PHP: ``X-TT.User`` is
    ``HTTP_X_TT_USER``; CGI-style servers read ``_`` as ``-``)."""
    out = []
    for _ in range(n):
        seps = ["-", "_", ".", ".", "_", "~", "+"]
        name = "".join(rng.choice(seps) if c == "-" else c for c in owned)
        name = _case(rng, name) + rng.choice(["", "", "", "", ".", "_", "-"])
        out.append(name)
    return out


def set_cookie_lines(rng: random.Random, owned: str, n: int) -> list[list[str]]:
    """Set-Cookie lines a hostile back end sends to plant ``owned`` (value PLANTEDn)."""
    out = []
    for k in range(n):
        secret = f"PLANTED{k}"
        spelled = cookie_names(rng, owned).replace("%00", "")
        forged = rng.choice(
            [
                f"={spelled}={secret}",
                f"{spelled}={secret}",
                f"x=1{rng.choice(SEPARATORS)}{spelled}={secret}",
                f'x="1 {spelled}={secret}"',
                f"{spelled}{secret}",
                f"{_case(rng, owned)}={secret}",
            ]
        )
        attrs = rng.choice(["", "; Path=/", "; HttpOnly; Secure", "; Domain=shop.example"])
        out.append([f"lang=id{attrs}", forged + attrs, "theme=dark"])
    return out


def hosts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        host = _case(rng, PAY_HOST) + rng.choice(["", "", ".", ".."])
        host += rng.choice(["", ":443", ":80", ":8080", ":", ":99999"])
        out.append(rng.choice(["", "", "u@", " "]) + host + rng.choice(["", "", "/x", "?a"]))
    return out


def browser_cookie_string(lines: list[str]) -> str:
    """The Cookie header a browser sends after storing ``lines`` (RFC 6265bis 5.6; written
    here independently of proxy.boundary, which is under test)."""
    jar: dict[str, str] = {}
    for line in lines:
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in line):
            continue
        pair = line.split(";", 1)[0]
        name, eq, value = pair.partition("=")
        if not eq:
            name, value = "", name
        name, value = name.strip(" \t"), value.strip(" \t")
        if name or value:
            jar[name] = value
    return "; ".join(f"{n}={v}" if n else v for n, v in jar.items())


# -- the tests ------------------------------------------------------------------------------------


@dataclass
class Reading:
    status: int
    body: bytes
    read: dict[str, Any] | None  # what the back end said it read; None: refused by Jalur


def dechunk(resp: RawResponse) -> bytes:
    """The body of a response that may be chunked (php -S sends neither length nor chunks,
    so Jalur relays it chunked)."""
    if (resp.header("Transfer-Encoding") or "").lower() != "chunked":
        return resp.body
    body, rest = b"", resp.body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    return body


async def send(p: ProxyServer, target: str, *headers: tuple[str, str | bytes]) -> Reading:
    resp = await raw_request(p.data_port, request("GET", target, *headers))
    resp.body = dechunk(resp)
    read = orjson.loads(resp.body) if resp.status == 200 else None
    if read is not None:
        assert read.get("stack") in STACKS, resp.body[:200]
    else:
        assert resp.status in (400, 404, 505), (target, resp.status, resp.body[:200])
    return Reading(resp.status, resp.body, read)


def owned_cookies(read: dict[str, Any], owner: str) -> dict[str, Any]:
    """The cookies a back end read under ``owner``'s cookie name (as that stack folds names:
    PHP has already mapped '.', ' ' and '[' to '_'; case is ignored, as some stacks do)."""
    owned = COOKIE_OF[owner].lower()
    return {k: v for k, v in read["cookies"].items() if k.lower() == owned}


async def proxy_for(harness: Harness, pair: dict[str, Backend]) -> ProxyServer:
    lenient = {**BOUNDARY, "header_names": "drop", "underscore_headers": "drop"}
    return await start(harness, pair["social"].url, pair["commerce"].url, boundary=lenient)


def rng_for(stack: str, family: str) -> random.Random:
    return random.Random(f"{stack}-{family}-{os.environ.get('JALUR_DIFF_SEED', '18')}")


@pytest.mark.parametrize("stack", STACKS)
async def test_no_transaction_path_reading_reaches_social(
    harness: Harness, stacks: dict[str, dict[str, Backend]], stack: str
) -> None:
    p = await proxy_for(harness, stacks[stack])
    reached = 0
    for target in paths(rng_for(stack, "paths"), EXAMPLES):
        got = await send(p, target)
        if got.read is None or got.read["system"] != "social":
            continue
        reached += 1
        assert got.read["route"] not in TRANSACTION_READINGS, (stack, target, got.read)
    # Plain social paths still reach social and read as nothing transactional.
    for target in ("/feed", "/api/feed/1", "/api/orders-promo", "/api/carts-of-the-week"):
        got = await send(p, target)
        assert got.read is not None, target
        assert got.read["system"] == "social", target
        assert got.read["route"] is None, target


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("system", SYSTEMS)
async def test_no_spelling_of_a_foreign_cookie_is_read(
    harness: Harness, stacks: dict[str, dict[str, Backend]], stack: str, system: str
) -> None:
    p = await proxy_for(harness, stacks[stack])
    secret = f"Secret{OTHER[system].title()}"
    lines_list = cookie_headers(
        rng_for(stack, f"cookies-{system}"), COOKIE_OF[OTHER[system]], secret, EXAMPLES
    )
    served = 0
    for lines in lines_list:
        got = await send(p, PATH_OF[system], *(("Cookie", line) for line in lines))
        assert got.read is not None, lines
        assert got.read["system"] == system
        served += 1
        assert not owned_cookies(got.read, OTHER[system]), (stack, lines, got.read)
    assert served == len(lines_list)
    # The system's own cookie still reaches it, and neutral ones too.
    own = f"{COOKIE_OF[system]}=mine; lang=id"
    got = await send(p, PATH_OF[system], ("Cookie", own))
    assert got.read is not None
    assert got.read["cookies"].get(COOKIE_OF[system]) == "mine"
    assert got.read["cookies"].get("lang") == "id"


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("system", SYSTEMS)
async def test_no_spelling_of_a_foreign_header_is_read(
    harness: Harness, stacks: dict[str, dict[str, Backend]], stack: str, system: str
) -> None:
    p = await proxy_for(harness, stacks[stack])
    rng = rng_for(stack, f"headers-{system}")
    secret = f"Secret{OTHER[system].title()}"
    for owned in HEADERS_OF[OTHER[system]]:
        for name in header_names(rng, owned, EXAMPLES // 2 or 1):
            got = await send(p, PATH_OF[system], (name, secret))
            if got.read is None:
                continue  # not a field name at all (the parser refuses it)
            assert got.read["system"] == system
            read = {n.lower().replace("_", "-") for n in got.read["headers"]}
            assert not read & set(HEADERS_OF[OTHER[system]]), (stack, name, got.read)


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("system", SYSTEMS)
async def test_a_planted_cookie_is_never_read_by_the_other_system(
    harness: Harness, stacks: dict[str, dict[str, Backend]], stack: str, system: str
) -> None:
    """``system``'s back end sends Set-Cookie lines planting the other system's cookie; the
    browser stores what Jalur relayed and sends it to the other system, whose back end must
    not read a planted value."""
    p = await proxy_for(harness, stacks[stack])
    other = OTHER[system]
    for lines in set_cookie_lines(
        rng_for(stack, f"set-cookie-{system}"), COOKIE_OF[other], EXAMPLES // 2 or 1
    ):
        emit = base64.b64encode("\n".join(lines).encode()).decode()
        got = await send(p, PATH_OF[system], ("X-Emit", emit))
        assert got.read is not None
        resp = await raw_request(p.data_port, request("GET", PATH_OF[system], ("X-Emit", emit)))
        relayed = [v for k, v in resp.headers if k.lower() == "set-cookie"]
        assert "lang=id" in "".join(relayed), (stack, relayed)  # the neutral ones pass
        jar = browser_cookie_string(relayed)
        if not jar:
            continue
        back = await send(p, PATH_OF[other], ("Cookie", jar))
        assert back.read is not None
        assert not owned_cookies(back.read, other), (stack, lines, relayed, back.read)


@pytest.mark.parametrize("stack", STACKS)
async def test_no_spelling_of_the_payment_host_reaches_social(
    harness: Harness, stacks: dict[str, dict[str, Backend]], stack: str
) -> None:
    p = await proxy_for(harness, stacks[stack])
    for host in hosts(rng_for(stack, "hosts"), EXAMPLES):
        got = await send(p, "/checkout", ("Host", host))
        if got.read is None:
            continue
        if got.read["system"] == "social":
            assert got.read["route"] is None, (stack, host, got.read)
        else:
            assert got.read["route"] == "pay-host", (stack, host, got.read)
