"""How a service's HTTP connections are served: uvicorn, bounding what a slow, idle or greedy client holds.

uvicorn (0.54, its httptools protocol) bounds none of it: a connection that sends nothing, or its headers a
byte every few seconds, is held for ever (its keep-alive timer starts only after a response, and any byte
stops it); so is a body sent a byte every few seconds, with a task waiting for it; the request line and
headers have no size limit (20 MB of headers were taken and held); a client that never reads its response
holds it in memory, or a streaming response's task, for ever (closing waits for the buffer to empty); and
connections are accepted until the process runs out of file descriptors, when every socket and file the
service opens fails with EMFILE (Postgres, Kafka, artifacts) and asyncio logs an error for every accept it
retries. docs/operations.md, "Slow clients and connection limits", says what this module does instead.

It speaks HTTP/1.1 only. uvicorn handed a request asking for a WebSocket to its websockets protocol, out of
reach of all the above (a POST asking for one was never answered, its connection held for ever); and
httptools reads what follows the headers of a request asking for any other protocol as that protocol's,
never as the request's body, so the request was served without its body, and the body, coming in a later
read, served as the next request: a request smuggled past whatever a proxy in front checked.

The deadlines cost the request path no timer: a connection keeps the time its request must have arrived by
(a float, set when a request starts and moved when its headers end and as its body comes), and the server's
own tick (uvicorn wakes every 0.1 s anyway) closes the connections past theirs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import resource
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import uvicorn
from prometheus_client import Counter
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from libs.errors import shown
from libs.http import error_body
from libs.logging import get_logger
from libs.settings import ServiceSettings

log = get_logger(__name__)

FD_RESERVE = 256
"""File descriptors kept out of the HTTP connections' reach: the database pools, Kafka's connections (one or
two per broker and client), artifact and temporary files, the interpreter's own."""

ACCEPT_BACKLOG = 128
"""Connections the kernel queues for the server (uvicorn's default: 2048). asyncio accepts as many as are
queued at once, and a connection past the limit holds its descriptor until it is answered 503 and closed a
few turns of the loop later: a flood of connections held about three queues' worth at once, so the limit
keeps that much room too, and a queue this short keeps it small. Past the queue the kernel makes clients
wait and retry."""

KEEP_ALIVE_S = 75
"""How long a connection may stay idle between requests. Longer than clients' idle expiry (httpx: 5 s,
browsers and load balancers: 60 s), so the server never closes a kept-alive connection at the moment a
client reuses it."""

LINGER_S = 2.0
"""How long a connection answered 408 or 431 is kept half-closed, its client's bytes read and dropped, so that
the client reads the answer before the connection ends."""

LOG_EVERY_S = 10.0
"""Connections cut off are logged as a tally at most this often: a flood of them is one line, not one each."""

CLOSED = Counter(
    "driftloop_http_connections_closed_total",
    "HTTP connections the server closed on their client, by reason: idle (opened and sent nothing in time), "
    "header-timeout, body-timeout (each answered 408), header-too-large (431), send-timeout (the client "
    "read nothing of its response in time), too-many-connections (503 as it was accepted).",
    ["reason"],
)

_WAITING, _HEAD, _BODY = "waiting", "head", "body"


def _answer(status: int, message: str, *extra: bytes) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with the body every error of the APIs has."""
    phrase = HTTPStatus(status).phrase
    body = json.dumps(error_body(message, phrase.lower().replace(" ", "-"))).encode()
    head = [
        f"HTTP/1.1 {status} {phrase}".encode(),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's headers (names in lower case) say a body follows them."""
    return any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
        for name, value in headers
    )


async def _refuse_upgrade_with_body(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request asking to switch protocols that has a body (the connection closes after it)."""
    upgrade = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"upgrade"), "")
    message = (
        f"the request asks to switch to another protocol (Upgrade: {shown(upgrade)}) and has a body: this "
        "server speaks HTTP/1.1 only and cannot read that body; send the request without the Upgrade header"
    )
    await JSONResponse(error_body(message, "bad-request"), status_code=400)(scope, receive, send)


class ClientLimits:
    """One server's bounds on its clients (from the service's settings), and the tally of the connections it
    cut off."""

    def __init__(self, settings: ServiceSettings, max_connections: int) -> None:
        self.header_timeout_s = settings.http_header_timeout_s
        self.body_timeout_s = settings.http_body_timeout_s
        self.s_per_body_byte = 1.0 / settings.http_body_min_bytes_per_s
        self.send_timeout_s = settings.http_send_timeout_s
        self.max_header_bytes = settings.http_max_header_bytes
        self.max_connections = max_connections
        self.header_timeout = _answer(
            408,
            f"the request's line and headers did not arrive within {self.header_timeout_s:g} s; the "
            "connection is closed: send the whole request at once",
        )
        self.body_timeout = _answer(
            408,
            f"the request body did not arrive in time ({self.body_timeout_s:g} s, and one more for every "
            f"{settings.http_body_min_bytes_per_s:,} bytes received); the connection is closed: send the "
            "body without pausing",
        )
        self.header_too_large = _answer(
            431,
            f"the request's line and headers are larger than {self.max_header_bytes:,} bytes; the connection "
            "is closed",
        )
        self.too_many = _answer(
            503,
            f"this server holds {max_connections:,} connections already; try again shortly",
            b"retry-after: 1",
        )
        self.lingering = 0
        self._untold: collections.Counter[str] = collections.Counter()
        self._told_at = float("-inf")
        self._swept_at: float | None = None

    def cut_off(self, reason: str) -> None:
        CLOSED.labels(reason).inc()
        self._untold[reason] += 1

    def sweep(self, connections: set[Any], now: float) -> None:
        """Close the connections whose client is past its deadline. The time the server was not reading a
        connection (its buffer of body full, a pipelined request waiting its turn, a ``100 Continue`` not sent
        yet, the answer to the request before still being made) is not the client's, and moves its deadline
        on."""
        elapsed = 0.0 if self._swept_at is None else now - self._swept_at
        self._swept_at = now
        late: list[GuardedHttp] = []
        unread: list[GuardedHttp] = []
        for conn in connections:
            if not isinstance(conn, GuardedHttp):
                continue
            if conn.deadline is not None:
                cycle = conn.cycle
                if conn.flow.read_paused or (
                    cycle is not None
                    and (
                        cycle.waiting_for_100_continue
                        or (conn.phase is _HEAD and not cycle.response_complete)  # pipelined behind it
                    )
                ):
                    conn.deadline += elapsed
                elif conn.deadline <= now:
                    late.append(conn)
            if conn.flow.write_paused:
                # Stalled since the last sweep that saw its buffer drain (resume_writing counts the drains).
                if conn.write_stalled != conn.writes_resumed:
                    conn.write_stalled, conn.write_stall_since = conn.writes_resumed, now
                elif now - conn.write_stall_since > self.send_timeout_s:
                    unread.append(conn)
        for conn in late:
            conn.cut_off_late()
        for conn in unread:
            conn.cut_off_unread()
        if self._untold and now - self._told_at >= LOG_EVERY_S:
            self._told_at = now
            log.warning(
                "HTTP connections closed on their clients (slow, idle, not reading, or too many at once)",
                **{reason.replace("-", "_"): n for reason, n in sorted(self._untold.items())},
                open_connections=len(connections),
                max_connections=self.max_connections,
            )
            self._untold.clear()


class _Lingering(asyncio.Protocol):
    """A connection answered 408 or 431, its side closed: what its client still sends is read and dropped
    until the client closes too, or for :data:`LINGER_S` at most."""

    def __init__(
        self, limits: ClientLimits, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.limits = limits
        limits.lingering += 1
        self.closing = loop.call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # asyncio closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.limits.lingering -= 1
        self.closing.cancel()


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ClientLimits`: a deadline for each request to arrive, a bound
    on its line and headers, on an unread response, and on the connections open at once."""

    def __init__(self, config: HttpConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.client_limits
        self.deadline: float | None = None
        self.phase: str | None = None
        self.head_bytes = 0
        self.chunk_bytes = 0
        self.writes_resumed = 0
        self.write_stalled = -1
        self.write_stall_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) + self.limits.lingering >= self.limits.max_connections:
            # Closed at once, so the process never runs out of descriptors; connection_lost ends the rest.
            self.transport = transport
            transport.write(self.limits.too_many)
            transport.close()
            self.limits.cut_off("too-many-connections")
            return
        super().connection_made(transport)
        self.phase = _WAITING
        self.deadline = self.loop.time() + self.limits.header_timeout_s

    def data_received(self, data: bytes) -> None:
        self.chunk_bytes = len(data)
        super().data_received(data)
        if self.phase is _HEAD:
            # Counted once a read has gone through the parser, from the read after the one the request began
            # in, and never a read that ends the headers (its body would be counted too): the bound holds to
            # within two reads (256 KiB each), and a request within it is never refused.
            self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
                self.limits.cut_off("header-too-large")
                self._answer_and_close(self.limits.header_too_large)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.phase = _HEAD
        self.head_bytes = -self.chunk_bytes
        if self.deadline is None:  # a later request on a kept-alive connection; the first has its own
            self.deadline = self.loop.time() + self.limits.header_timeout_s

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and _declares_body(self.headers):
            # httptools skips the body of a request asking to switch protocols (it is the other protocol's):
            # it is refused rather than served without it, and the connection closed rather than the body
            # read as the next request.
            app, self.app = self.app, _refuse_upgrade_with_body
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            self.cycle.keep_alive = False  # also when uvicorn answered 503 in its stead
        else:
            super().on_headers_complete()
        self.phase = _BODY
        if self.deadline is not None:
            # From the headers' deadline: time the headers did not use is left to the body.
            self.deadline += self.limits.body_timeout_s

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.deadline is not None:
            self.deadline += len(body) * self.limits.s_per_body_byte

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.phase = None
        self.deadline = None

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn warns of every request asking for an upgrade, and tells the operator to install a WebSocket
        # library: a client's header is ignored as RFC 9110 (7.8) allows, nothing for the log.
        pass

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writes_resumed += 1

    def cut_off_late(self) -> None:
        """Close a connection whose client is past its deadline: answer 408 when it was sending a request that
        has no answer yet, close it without an answer when it had not begun one."""
        phase, self.phase, self.deadline = self.phase, None, None
        transport = self.transport
        if transport.is_closing():
            return
        if phase is _WAITING:
            self.limits.cut_off("idle")
            transport.close()
            return
        self.limits.cut_off("header-timeout" if phase is _HEAD else "body-timeout")
        cycle = self.cycle
        if phase is _HEAD or cycle is None:
            self._answer_and_close(self.limits.header_timeout)
        elif not cycle.response_started:
            self._answer_and_close(self.limits.body_timeout)
        elif cycle.response_complete:
            self._answer_and_close(b"")  # answered before its body came (a 413): the rest is not waited for
        else:
            transport.close()  # answering while its body comes: the answer ends here

    def _answer_and_close(self, answer: bytes) -> None:
        """Send ``answer`` and close the connection the way RFC 9112 (9.6) asks: this side first, then, once
        the client has had time to read the answer, the rest. Closing at once while the client's bytes keep
        coming resets the connection, and a client may lose the answer to the reset before reading it."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app waits for the body: it reads a disconnect, and no answer of its follows this one.
            cycle.disconnected = True
            cycle.message_event.set()
        # What connection_lost does, which uvicorn no longer calls once the connection lingers.
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        transport = self.transport
        transport.write(answer)
        transport.set_protocol(_Lingering(self.limits, transport, self.loop))
        transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def cut_off_unread(self) -> None:
        """Drop a connection whose client has read nothing of its answer for too long, without waiting for the
        unread bytes to leave (closing would: for ever)."""
        self.limits.cut_off("send-timeout")
        self.transport.abort()


class HttpConfig(uvicorn.Config):
    """uvicorn's configuration, carrying the server's :class:`ClientLimits` to its connections."""

    client_limits: ClientLimits


class HttpServer(uvicorn.Server):
    """uvicorn, sweeping its connections for late clients on every tick, without its own signal handling (the
    service stops everything together)."""

    config: HttpConfig
    server_state: ServerState

    async def on_tick(self, counter: int) -> bool:
        self.config.client_limits.sweep(self.server_state.connections, asyncio.get_running_loop().time())
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def connection_room(wanted: int, open_files_limit: int) -> int:
    """The connections a process may hold: ``wanted``, at most its open-files limit less :data:`FD_RESERVE`
    and three accept queues (:data:`ACCEPT_BACKLOG`), at least 1."""
    if open_files_limit == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, open_files_limit - FD_RESERVE - 3 * ACCEPT_BACKLOG))


def http_server(app: Any, settings: ServiceSettings) -> HttpServer:
    """The HTTP server of a service: its app on ``settings.http_host:http_port`` with the client limits of its
    settings."""
    open_files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    max_connections = connection_room(settings.http_max_connections, open_files)
    if max_connections < settings.http_max_connections:
        log.warning(
            "fewer HTTP connections than DRIFTLOOP_HTTP_MAX_CONNECTIONS: the open-files limit leaves room "
            "for no more; raise it (ulimit -n) or lower the setting",
            http_max_connections=settings.http_max_connections,
            open_files_limit=open_files,
            kept_for_the_rest=FD_RESERVE,
            max_connections=max_connections,
        )
    config = HttpConfig(
        app,
        host=settings.http_host,
        port=settings.http_port,
        http=GuardedHttp,
        log_config=None,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        # Requests get 503 once as many tasks are in flight (those of clients gone away still run). uvicorn
        # counts the connection asking among the open ones, which GuardedHttp keeps to max_connections.
        limit_concurrency=max_connections + 1,
        backlog=ACCEPT_BACKLOG,
        ws="none",  # no service serves a WebSocket; a request asking for one is served as HTTP (GuardedHttp)
    )
    config.client_limits = ClientLimits(settings, max_connections)
    return HttpServer(config)
