"""The Python stack for tests/test_differential.py: ``python backend_aiohttp.py SYSTEM``,
prints ``ready PORT``. aiohttp's own reading: ``request.cookies``, ``request.headers``,
``request.path`` (decoded), routes compared with ``str.casefold``, ids read with ``int()``
(which takes a sign, blanks and any Unicode decimal digits)."""

from __future__ import annotations

import asyncio
import base64
import re
import sys

from aiohttp import web

SYSTEM = sys.argv[1]
SUFFIX = re.compile(r"\.[A-Za-z0-9]+$")


def same(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


async def handle(request: web.Request) -> web.Response:
    route: str | None = None
    order: int | None = None
    host = re.sub(r":[0-9]*$", "", request.headers.get("Host", "").lower()).removesuffix(".")
    if host == "pay.shop.example":
        route = "pay-host"
    segs = [s for s in request.path.split("/") if s]
    if route is None and len(segs) >= 2 and same(segs[0], "api"):
        second = SUFFIX.sub("", segs[1])
        if same(second, "payment"):
            route = "payment"
        elif same(second, "cart"):
            route = "cart"
        elif same(segs[1], "orders") and len(segs) >= 3:
            try:
                order = int(SUFFIX.sub("", segs[2]))
                route = "orders"
            except ValueError:
                pass
    resp = web.json_response(
        {
            "stack": "python",
            "system": SYSTEM,
            "route": route,
            "id": order,
            "cookies": dict(request.cookies),
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
    )
    emit = request.headers.get("X-Emit")
    if emit:
        for line in base64.b64decode(emit).decode().split("\n"):
            resp.headers.add("Set-Cookie", line)
    return resp


async def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"ready {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
