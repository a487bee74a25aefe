"""CPU of GET one model version inside the registry's app, with and without the hot lane, side by side.

No sockets and no HTTP server: each request is one ASGI call into an app built as the service builds it
(``libs.http.create_app``, its middleware, the dev tokens), reading the version from the running
Postgres, so what differs between the two sides is only the route's way through the app: FastAPI's router
(route search, the request-response wrapper, dependency solving) or ``libs.http.HotRoutes``. Rounds
alternate between the sides; the CPU time of this process per request is reported (median and range of the
rounds). The HTTP bench (``get_version.py``) measures latency on a real server; this one isolates the
lane's saving, which that one's CPU figure, taken over a minute of a shared host, cannot show apart.

    deploy/local/driftloop infra up      # and churn-demo v1 registered (docs/registry.md)
    DRIFTLOOP_DATABASE_URL=postgresql://driftloop@127.0.0.1:54329/driftloop \\
        .venv/bin/python -m bench.registry.in_process --model churn-demo --version 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
from typing import Any

from starlette.types import ASGIApp, Message

from libs.db import create_pool
from libs.http import create_app
from services.registry import api
from services.registry.settings import RegistrySettings


def registry_app(pool: Any, *, lane: bool) -> ASGIApp:
    """The registry's app with its reads pool; the version page on the lane, or in FastAPI's router."""
    settings = RegistrySettings(env="test")
    app = create_app(
        settings,
        title="registry",
        description="",
        routers=[api.router] if lane else [api.router, api.hot_router],
        hot=[api.hot_router] if lane else [],
    )
    app.state.reads = pool
    return app


async def get(app: ASGIApp, path: str, token: str) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8101),
        "state": {},
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise SystemExit(f"GET {path} answered {sent[0]['status']}: {sent[-1].get('body', b'')[:200]!r}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--token", default="dev-viewer")
    parser.add_argument("--requests", type=int, default=1000, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    path = f"/v1/models/{args.model}/versions/{args.version}"
    pool = await create_pool(os.environ["DRIFTLOOP_DATABASE_URL"], schema="registry", min_size=1, max_size=2)
    try:
        sides = {
            "FastAPI's router": registry_app(pool, lane=False),
            "hot lane": registry_app(pool, lane=True),
        }
        for app in sides.values():  # warm up: connections, caches, code paths
            for _ in range(300):
                await get(app, path, args.token)
        rounds: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, app in sides.items():
                gc.collect()
                started = time.process_time()
                for _ in range(args.requests):
                    await get(app, path, args.token)
                rounds[name].append((time.process_time() - started) / args.requests * 1e6)
    finally:
        await pool.close()
    print(f"GET {path}, {args.rounds} rounds of {args.requests} per side, CPU of this process per request:")
    for name, values in rounds.items():
        print(
            f"  {name:16} median {statistics.median(values):6.0f} µs  "
            f"(rounds {min(values):.0f}-{max(values):.0f} µs)"
        )
    plain, lane = (statistics.median(v) for v in rounds.values())
    print(f"  the lane saves {plain - lane:.0f} µs per request ({(plain - lane) / plain:.0%})")


if __name__ == "__main__":
    asyncio.run(main())
