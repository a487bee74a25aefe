"""Clients that are slow, idle or greedy on purpose, against a real uvicorn built as a service builds it
(libs.http_server.http_server, on an ephemeral port): each is answered or dropped, and lets go of what it
held, where uvicorn alone held every one of them for ever."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import REGISTRY
from pydantic import BaseModel

from libs.http import BodyRoute, create_app
from libs.http_server import (
    ACCEPT_BACKLOG,
    FD_RESERVE,
    GuardedHttp,
    HttpServer,
    connection_room,
    http_server,
)
from libs.settings import ServiceSettings
from tests.waiting import eventually

# Small bounds, so that each client is late within a few of eventually's polls.
FAST = {"http_header_timeout_s": 0.3, "http_body_timeout_s": 0.3, "http_send_timeout_s": 0.3}
BIG = 20_000_000


class Item(BaseModel):
    name: str


def app(settings: ServiceSettings) -> FastAPI:
    """A body route on each lane (FastAPI's, with a model; the hot one, reading its own bytes) and two large
    answers (one whole, one streamed)."""
    plain = APIRouter(prefix="/v1", route_class=BodyRoute)
    hot = APIRouter(prefix="/v2", route_class=BodyRoute)

    @plain.post("/model")
    async def with_model(item: Item) -> dict[str, str]:
        return {"name": item.name}

    @plain.get("/big")
    async def big() -> Response:
        return Response(b"x" * BIG)

    @plain.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(BIG // 100_000):
                yield b"y" * 100_000

        return StreamingResponse(chunks())

    @hot.post("/bytes/{name}")
    async def hot_bytes(name: str, request: Request) -> Response:
        return Response(await request.body())

    return create_app(settings, title="t", description="t", routers=[plain], hot=[hot])


@dataclass
class Served:
    server: HttpServer
    port: int
    clients: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self, **socket_options: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket()
        for option, value in socket_options.items():
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, option), value)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        self.clients.append(writer)
        return reader, writer

    @property
    def connections(self) -> int:
        return len(self.server.server_state.connections)

    @property
    def tasks(self) -> int:
        return len(self.server.server_state.tasks)


@asynccontextmanager
async def serving(**limits: Any) -> AsyncIterator[Served]:
    settings = ServiceSettings(env="test", **{**FAST, **limits})
    server = http_server(app(settings), settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    served = Served(server, sock.getsockname()[1])
    try:
        await eventually(lambda: _true(server.started))
        yield served
    finally:
        for writer in served.clients:
            writer.close()
        server.should_exit = True
        await task
        sock.close()


async def _true(value: bool) -> bool:
    return value


def closed_count(reason: str) -> float:
    return REGISTRY.get_sample_value("driftloop_http_connections_closed_total", {"reason": reason}) or 0.0


async def until_closed(
    reader: asyncio.StreamReader, meanwhile: Callable[[], Awaitable[None]] | None = None
) -> bytes:
    """Everything the server sends until it closes the connection; ``meanwhile`` runs before each look (a
    client sending its request slowly)."""
    got = bytearray()

    async def closed() -> bool:
        if meanwhile is not None:
            await meanwhile()
        try:
            chunk = await asyncio.wait_for(reader.read(65_536), 0.05)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        got.extend(chunk)
        return not chunk

    await eventually(closed, deadline_s=10)
    return bytes(got)


async def head_of(reader: asyncio.StreamReader) -> bytes | None:
    """The status line and headers of the next answer, or None when they have not come yet."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.05)
    except TimeoutError:
        return None


def dribble(writer: asyncio.StreamWriter, byte: bytes) -> Callable[[], Awaitable[None]]:
    async def send() -> None:
        if writer.is_closing():
            return
        writer.write(byte)
        with contextlib.suppress(ConnectionError):  # the server has closed: what it answered is read next
            await writer.drain()

    return send


def answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split(b" ")[1]), json.loads(body)


async def test_a_connection_that_sends_nothing_is_closed() -> None:
    before = closed_count("idle")
    async with serving() as served:
        reader, _ = await served.connect()
        assert await until_closed(reader) == b""
        await eventually(lambda: _true(served.connections == 0))
    assert closed_count("idle") == before + 1


@pytest.mark.parametrize("after_a_request", [False, True], ids=["first-request", "kept-alive"])
async def test_headers_sent_a_byte_at_a_time_get_408(after_a_request: bool) -> None:
    before = closed_count("header-timeout")
    async with serving() as served:
        reader, writer = await served.connect()
        if after_a_request:
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await reader.readuntil(b'{"status":"live"}')).startswith(b"HTTP/1.1 200")
        writer.write(b"POST /v2/bytes/churn HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        status, body = answer(await until_closed(reader, dribble(writer, b"a")))
        assert status == 408 and body["code"] == "request-timeout"
        assert "line and headers did not arrive within 0.3 s" in body["error"]
    assert closed_count("header-timeout") == before + 1


@pytest.mark.parametrize("path", ["/v1/model", "/v2/bytes/churn"], ids=["fastapi-lane", "hot-lane"])
async def test_a_body_sent_a_byte_at_a_time_gets_408_and_its_task_ends(path: str) -> None:
    before = closed_count("body-timeout")
    async with serving() as served:
        reader, writer = await served.connect()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000\r\n\r\n".encode()
        )
        status, body = answer(await until_closed(reader, dribble(writer, b" ")))
        assert status == 408 and body["code"] == "request-timeout"
        assert "request body did not arrive in time" in body["error"]
        await eventually(lambda: _true(served.tasks == 0 and served.connections == 0))
    assert closed_count("body-timeout") == before + 1


async def test_a_body_sent_steadily_is_never_cut_off_however_long_it_takes() -> None:
    # Each poll sends 1,000 bytes, a second's more time at the default rate; the body takes many
    # polls, far longer than http_body_timeout_s's 0.3 s.
    async with serving() as served:
        reader, writer = await served.connect()
        payload = b'{"name": "' + b"n" * 20_000 + b'"}'
        writer.write(
            f"POST /v1/model HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
        )
        rest = payload

        async def next_part() -> None:
            nonlocal rest
            part, rest = rest[:1000], rest[1000:]
            writer.write(part)
            await writer.drain()

        async def answered() -> bytes | None:
            await next_part()
            try:
                return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.05)
            except TimeoutError:
                return None

        head = await eventually(answered, deadline_s=10)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert not rest


async def test_a_body_still_coming_after_its_413_is_not_waited_for() -> None:
    async with serving() as served:
        reader, writer = await served.connect()
        writer.write(
            b"POST /v2/bytes/churn HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 100
        )
        raw = await until_closed(reader, dribble(writer, b"x"))
        assert raw.startswith(b"HTTP/1.1 413"), raw


async def test_headers_larger_than_the_limit_get_431() -> None:
    before = closed_count("header-too-large")
    async with serving(http_max_header_bytes=8192, http_header_timeout_s=60) as served:
        reader, writer = await served.connect()
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: t\r\n")
        status, body = answer(await until_closed(reader, dribble(writer, b"X-Pad: " + b"a" * 4096 + b"\r\n")))
        assert status == 431 and "larger than 8,192 bytes" in body["error"]
    assert closed_count("header-too-large") == before + 1


async def test_connections_past_the_limit_get_503_and_are_closed() -> None:
    before = closed_count("too-many-connections")
    async with serving(http_max_connections=3, http_header_timeout_s=60) as served:
        held = [await served.connect() for _ in range(3)]
        await eventually(lambda: _true(served.connections == 3))
        reader, _ = await served.connect()
        status, body = answer(await until_closed(reader))
        assert status == 503 and "holds 3 connections already" in body["error"]
        assert served.connections == 3
        # One of those let go, a new client is served.
        held[0][1].close()
        await eventually(lambda: _true(served.connections == 2))
        reader, writer = await served.connect()
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await reader.readuntil(b'{"status":"live"}')).startswith(b"HTTP/1.1 200")
    assert closed_count("too-many-connections") == before + 1


@pytest.mark.parametrize("path", ["/v1/big", "/v1/stream"], ids=["whole", "streamed"])
async def test_an_answer_left_unread_is_dropped_with_what_it_held(path: str) -> None:
    before = closed_count("send-timeout")
    async with serving() as served:
        _, writer = await served.connect(SO_RCVBUF=4096)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await eventually(lambda: _true(served.connections == 0 and served.tasks == 0))
    assert closed_count("send-timeout") == before + 1


def asking_for(upgrade: str, body: bytes) -> bytes:
    """A request asking to switch to another protocol, with ``body``."""
    return (
        f"POST /v1/model HTTP/1.1\r\nHost: t\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
async def test_a_request_asking_for_an_upgrade_without_a_body_is_served_as_http(upgrade: str) -> None:
    # No route is a WebSocket's: uvicorn's websockets protocol answered the handshake itself (403, 405 or
    # 400 in plain text), outside every limit of this module.
    async with serving() as served:
        reader, writer = await served.connect()
        writer.write(asking_for(upgrade, b"").replace(b"POST /v1/model", b"GET /health/live"))
        head = await eventually(lambda: head_of(reader))
        assert head.startswith(b"HTTP/1.1 200"), head
        assert await reader.readuntil(b"}") == b'{"status":"live"}'
        connections = served.server.server_state.connections
        assert connections and all(isinstance(c, GuardedHttp) for c in connections)


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
async def test_a_request_asking_for_an_upgrade_with_a_body_is_refused_and_closed(upgrade: str) -> None:
    # httptools reads what follows such a request's headers as the other protocol's, never as its body.
    # uvicorn's websockets protocol left it unanswered, its connection held for ever; otherwise the
    # request was served without its body, the body dropped.
    async with serving() as served:
        reader, writer = await served.connect()
        writer.write(asking_for(upgrade, b'{"name": "a"}'))
        status, body = answer(await until_closed(reader))
        assert status == 400 and body["code"] == "bad-request"
        assert f"Upgrade: {upgrade!r}" in body["error"] and "without the Upgrade header" in body["error"]
        await eventually(lambda: _true(served.connections == 0))


async def test_the_body_of_a_request_asking_for_an_upgrade_is_never_served_as_a_request() -> None:
    # The body of a request asking for h2c, coming in a later read, was served as the next request: a
    # request smuggled past whatever a proxy in front of the service checked.
    hidden = b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    async with serving() as served:
        reader, writer = await served.connect()
        request = asking_for("h2c", hidden)
        writer.write(request[: -len(hidden)])
        head = await eventually(lambda: head_of(reader))
        writer.write(hidden)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        raw = head + await until_closed(reader)
    status, _ = answer(raw)
    assert status == 400
    assert b'"live"' not in raw


def test_connections_leave_room_for_the_pools_and_files_under_the_open_files_limit() -> None:
    assert connection_room(1000, 1024) == 1024 - FD_RESERVE - 3 * ACCEPT_BACKLOG == 384
    assert connection_room(1000, 20_000) == 1000
    assert connection_room(1000, resource.RLIM_INFINITY) == 1000
    assert connection_room(1000, 100) == 1


def test_the_server_is_configured_from_the_service_settings() -> None:
    settings = ServiceSettings(env="test", http_max_connections=50)
    server = http_server(app(settings), settings)
    assert server.config.limit_concurrency == 51  # uvicorn counts the connection asking among the open
    assert server.config.client_limits.max_connections == 50
    assert server.config.timeout_keep_alive == 75
    assert server.config.backlog == ACCEPT_BACKLOG
