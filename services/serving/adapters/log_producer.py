"""The prediction log's producer process: serving hands each item over a socket, the child encodes it and
produces it to Kafka on the other core.

Encoding a 100-row PredictionsLogged (~27 KB of JSON, most of it formatting ~800 floats) and producing it
cost the event loop 220-270 µs per request, on the loop that answers requests. Here the loop pays only the
hand-off: a small JSON head, the model's outputs as array bytes and the request body as it came, to a Unix
socket (see :func:`~services.serving.adapters.prediction_log.pack`). The child reads the body back with the
same JSON reader as the request, so the records it logs are the very records that were answered, and it
builds the event with the same encoder as before: the wire format does not change.

The loop packs the items it was offered every few milliseconds (``flush_s``), all at once, and writes
them in one go; while items flow, the child collects them every few milliseconds (``poll_s``) instead of
being woken by each write (see :func:`_receive`).

Bounded, never silent: what the child has not read waits in the socket's buffer (asked for as large as
``handoff_bytes``; the kernel may give less), then in the loop's write buffer, and what is not packed yet
in the loop's queue, up to ``handoff_bytes`` beyond the socket; beyond that an item is dropped and counted
(``reason="buffer-full"``).
The child's own queue is bounded too: when it is full it stops reading, and the backpressure reaches the
hand-off. The child reports its sent / send-failed / unencodable / oversized counts every half second and
the parent adds them to its /metrics; items lost with a crashed child are counted
(``reason="producer-exited"``), items offered while no child runs as well (``reason="producer-down"``).
A child that is alive but sends no report for ``stall_s`` (stopped, deadlocked, its loop blocked) would
never exit, and every item offered after its socket filled would be dropped as buffer-full until serving
restarted: serving kills it (SIGKILL), counts what it was handed as lost (``reason="producer-stalled"``)
and starts another as after a crash. The reports come from the child's main task, not from the sender, so
a child whose sends wait on a slow broker keeps reporting and is left alone.

The child dies with serving: it reads EOF on the socket when the parent is gone and asks the kernel for
SIGTERM at its parent's death (``PR_SET_PDEATHSIG``); it is in serving's process group, which the
supervisor reaps. A clean stop closes the parent's side after what is buffered: the child sends the rest,
flushes the producer and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import orjson

from libs.logging import configure_logging, get_logger
from libs.settings import KafkaSettings
from services.serving.adapters.prediction_log import (
    BUFFERED,
    DROPPED,
    FRAME,
    SENT,
    KafkaPredictionLog,
    Unpacker,
    frame_pieces,
)
from services.serving.domain import LogItem

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_REPORT_S = 0.5
_COUNTS = ("sent", "send-failed", "unencodable", "oversized")
_FLUSH_BYTES = 64 * 1024
_RECEIVE_BYTES = 1 << 20
_IDLE_POLLS = 20
END = FRAME.pack(0, 0)
"""The frame that ends a clean stop (a real frame always has a head)."""


RESTART_DELAYS_S = (0.5, 5.0)
"""The wait before the producer process is started again: the first, and the most it doubles to."""
HEALTHY_RUN_S = 60.0
"""A producer process that ran this long before it died is restarted after the first wait again."""
FIRST_REPORT_S = 30.0
"""How long a new producer process may take to send its first report (Python and the imports take about a
second, several on a loaded host) before it counts as stalled; ``stall_s`` when that is longer. Held to
``stall_s`` from its start, a slow start would be killed, and restarted, over and over."""


def restart_delay(previous: float | None, *, ran_s: float) -> float:
    """The wait before the next producer process, after one that ran ``ran_s``; ``previous`` is the wait
    before that one (None: none yet). Doubled while processes die young, the first again after one that ran
    a healthy while: it never came back down, so after a few crashes over serving's lifetime each restart
    waited the most, and the items offered meanwhile were dropped (``producer-down``)."""
    first, most = RESTART_DELAYS_S
    if previous is None or ran_s >= HEALTHY_RUN_S:
        return first
    return min(previous * 2, most)


class ProcessPredictionLog:
    """The serving side: ``offer`` queues an item and never waits; every few milliseconds (or sooner, when
    ``_FLUSH_BYTES`` wait) the queued items are packed into frames and written to the producer process's
    socket at once."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        source: str,
        buffer: int,
        batch: int,
        linger_ms: int,
        handoff_bytes: int,
        flush_s: float = 0.005,
        poll_s: float = 0.005,
        stop_timeout_s: float = 8.0,
        stall_s: float = 10.0,
        log_level: str = "INFO",
        log_json: bool = True,
    ) -> None:
        self.config = {
            "kafka": _kafka_config(kafka),
            "source": source,
            "buffer": buffer,
            "batch": batch,
            "linger_ms": linger_ms,
            "poll_s": poll_s,
            "stop_timeout_s": stop_timeout_s,
            "log_level": log_level,
            "log_json": log_json,
        }
        self.handoff_bytes = handoff_bytes
        self._flush_bytes = min(_FLUSH_BYTES, handoff_bytes // 4) if flush_s > 0 else 0
        self.flush_s = flush_s
        self.stop_timeout_s = stop_timeout_s
        self.stall_s = stall_s
        self.process: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._writer: asyncio.StreamWriter | None = None  # closes its transport when collected: kept
        self._last_body: bytes | None = None
        self._written = 0
        self._pending: list[LogItem] = []
        self._pending_bytes = 0
        self._flush_at: asyncio.TimerHandle | None = None
        self._reported = dict.fromkeys(_COUNTS, 0)
        self._settled = 0
        self._reports = 0
        self._stalled = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._connected = asyncio.Event()

    async def connected(self) -> None:
        """Wait until a producer process runs and reads items (it reports once at start)."""
        await self._connected.wait()

    def offer(self, item: LogItem) -> bool:
        """Hand an item to the producer; when the hand-off buffer is full (or no producer runs), drop it and
        count it."""
        transport = self._transport
        if transport is None or transport.is_closing():
            DROPPED.labels("producer-down").inc()
            return False
        if transport.get_write_buffer_size() + self._pending_bytes >= self.handoff_bytes:
            DROPPED.labels("buffer-full").inc()
            return False
        # Kept as it is and packed with the others at the flush, a few milliseconds later, in one tight loop
        # and one write (and no wake-up of the producer, which collects on its own). Packed here, once per
        # request between the request's other work, the same pack cost the serving process 13.5 µs a 1-row
        # request instead of 4 (its code and data cold each time). 100-row items wait too, several to a
        # write. The items are the request's own objects, which nothing changes after the answer.
        self._pending.append(item)
        self._pending_bytes += _estimate(item)
        self._written += 1
        if self._pending_bytes >= self._flush_bytes:
            self._flush()
        elif self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(self.flush_s, self._flush)
        return True

    def _flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        transport = self._transport
        if not pending or transport is None or transport.is_closing():
            return  # counted as lost with the producer that is gone
        pieces: list[bytes] = []
        last = self._last_body
        for item in pending:
            body = item.body
            try:
                pieces += frame_pieces(item, body_sent=body is not None and body is last)
            except Exception as exc:
                self._written -= 1
                DROPPED.labels("unencodable").inc()
                log.error("prediction log item cannot be handed over", model=item.model, error=repr(exc))
                continue
            last = body
        self._last_body = last
        transport.write(b"".join(pieces))

    async def run(self) -> None:
        """Run the producer process until stopped, restarting it when it dies or stalls; on stop, let it
        flush."""
        loop = asyncio.get_running_loop()
        delay: float | None = None
        while not self._stopping:
            started = loop.time()
            try:
                reader = await self._start()
            except Exception as exc:
                log.error("prediction log producer cannot start", error=repr(exc))
            else:
                await self._follow_until_stopped(reader)
                code = await self._reap()
                lost = self._written - self._settled
                if self._stopping and lost <= 0:
                    return
                if lost > 0 and self._stalled:
                    DROPPED.labels("producer-stalled").inc(lost)
                elif lost > 0:
                    DROPPED.labels("producer-exited").inc(lost)
                if self._stopping:
                    log.error("prediction log producer stopped before sending everything", lost=lost)
                    return
                log.error(
                    "prediction log producer exited; starting another",
                    code=code,
                    lost=lost,
                    stalled=self._stalled,
                )
            delay = restart_delay(delay, ran_s=loop.time() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=delay)

    async def stop(self) -> None:
        """Stop taking items; the producer sends what it was handed and exits (``run`` then returns)."""
        self._stopping = True
        self._stopped.set()
        self._connected.clear()
        self._flush()
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            # After what is still buffered: the producer reads everything, then this empty frame, and
            # still has the socket to send its last counts (a half-closed socket would not do on uvloop).
            transport.write(END)

    async def _start(self) -> asyncio.StreamReader:
        ours, theirs = socket.socketpair()
        # What the socket cannot take waits in the loop's write buffer until the loop's next turn, and a turn
        # at saturation answers about a request per connection: with the default buffer (208 KiB, ~10 frames
        # of 100 rows) the hand-off, not the child, set the pace, and in a sustained 100-row saturation run
        # a quarter of the items were dropped as buffer-full while the child sat idle 60% of the time.
        # Asked for as large as the hand-off, never smaller than the default; Linux gives twice the
        # request, up to twice net.core.wmem_max.
        if ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < self.handoff_bytes:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.handoff_bytes // 2)
        try:
            # Spawned from the loop's own thread, not a worker thread: PR_SET_PDEATHSIG fires when the
            # spawning *thread* ends. A spawn (vfork + exec) takes milliseconds, once per producer.
            self.process = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(orjson.dumps(self.config) + b"\n")
        self._last_body = None
        self._written = 0
        self._pending, self._pending_bytes = [], 0
        self._reported = dict.fromkeys(_COUNTS, 0)
        self._settled = 0
        self._reports = 0
        self._stalled = False
        BUFFERED.set(0)
        self._writer = writer
        self._transport = writer.transport
        return reader

    async def _follow_until_stopped(self, reader: asyncio.StreamReader) -> None:
        """Follow the producer until it exits, or, once stopped, until it had its time to flush."""
        following = asyncio.create_task(self._follow(reader))
        stopped = asyncio.create_task(self._stopped.wait())
        watching = asyncio.create_task(self._watch())
        try:
            await asyncio.wait([following, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                await asyncio.wait([following], timeout=self.stop_timeout_s + 2)
            if not following.done() and self.process is not None:
                log.error("prediction log producer did not flush in time; killing it", pid=self.process.pid)
                self.process.kill()
                await asyncio.wait([following], timeout=2)
        finally:
            watching.cancel()
            stopped.cancel()
            following.cancel()

    async def _watch(self) -> None:
        """Kill the producer when it sends no report for ``stall_s`` (``FIRST_REPORT_S`` before its first)
        while it runs: alive but stuck, it would hold the hand-off full for ever. Its socket is closed at
        once, so what is offered meanwhile counts as ``producer-down``, and ``run`` reaps it, counts what it
        was handed as ``producer-stalled`` and starts another; the stop has its own bound (the child does
        not report while it flushes).

        Counted in this loop's own ticks of ``_REPORT_S`` without a report, not by the clock: when serving's
        loop is held up (a model loading), the reports wait unread in the socket, and the tick that ends the
        hold may come before they are read. Read by the clock, that hold would count against the child;
        as ticks it is one."""
        process = self.process
        seen, missed = self._reports, 0
        while not self._stopping:
            await asyncio.sleep(_REPORT_S)
            if self._reports != seen:
                seen, missed = self._reports, 0
                continue
            missed += 1
            allowed = self.stall_s if seen else max(self.stall_s, FIRST_REPORT_S)
            if missed * _REPORT_S < allowed or self._stopping or process is None:
                continue
            log.error(
                "prediction log producer stalled: no report; killing it and starting another",
                pid=process.pid,
                silent_s=missed * _REPORT_S,
                stall_s=self.stall_s,
            )
            self._stalled = True
            # SIGKILL: it is not answering, and a stopped process would hold a SIGTERM pending. A process
            # that already ended is not signalled (Popen checks), so no other process can be hit.
            process.kill()
            if self._transport is not None:
                self._transport.abort()  # the reader sees its end now (the kernel's may wait on the kill)
            return

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        """Add the producer's reported counts to this process's metrics until it closes the socket."""
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                line = b""
            if not line:
                self._connected.clear()
                if self._transport is not None:
                    self._transport.abort()
                    self._transport = None
                return
            counts = orjson.loads(line)
            self._reports += 1
            self._connected.set()
            for name in _COUNTS:
                delta = int(counts[name]) - self._reported[name]
                if delta > 0:
                    (SENT if name == "sent" else DROPPED.labels(name)).inc(delta)
                    self._reported[name] = int(counts[name])
            # In items, as handed over: the counts are of events, several for an item over the event limit.
            self._settled = int(counts["settled"])
            BUFFERED.set(max(0, self._written - self._settled))

    async def _reap(self) -> int | None:
        process = self.process
        if process is None:
            return None
        try:
            return await asyncio.to_thread(process.wait, self.stop_timeout_s + 5)
        except subprocess.TimeoutExpired:
            log.error("prediction log producer did not exit; killing it", pid=process.pid)
            process.kill()
            return await asyncio.to_thread(process.wait)


def _estimate(item: LogItem) -> int:
    """About the bytes an item's frame takes (a body is counted even when the frame will reuse it)."""
    return (len(item.body) if item.body is not None else 0) + 96 * len(item.prediction_ids) + 256


def _kafka_config(kafka: KafkaSettings) -> dict[str, Any]:
    data = kafka.model_dump(mode="json")
    if kafka.sasl_password is not None:
        data["sasl_password"] = kafka.sasl_password.get_secret_value()
    return data


# --- the producer process ----------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the parent dies (Linux); the socket's EOF tells as well, this covers a stuck read."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request above
        os._exit(0)


def _read_config(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """The configuration line serving writes first (blocking: nothing else runs yet), and what followed it."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(_RECEIVE_BYTES)
        if not chunk:
            raise ConnectionError("serving closed the socket before sending the configuration")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return orjson.loads(line), rest


async def _receive(sock: socket.socket, poll_s: float) -> bytes:
    """What serving wrote since the last call; b"" once it closed the socket.

    While items flow, collected every ``poll_s`` rather than on each write: the socket is then in no event
    loop's watch list, so serving's writes wake nobody, and one read takes many frames. Woken by every
    write, the child was scheduled once per request (and serving preempted more often): in bench/serving
    the child spent 13-60% more CPU per 100-row request. After ``_IDLE_POLLS`` empty polls, and always
    with ``poll_s`` 0, it waits for the next write instead, so an idle replica's child sleeps. Between
    collections the writes wait in the socket's buffer and then in serving's write buffer, both within
    the hand-off's bound."""
    try:
        for _ in range(_IDLE_POLLS if poll_s > 0 else 0):
            try:
                return sock.recv(_RECEIVE_BYTES)
            except BlockingIOError:
                await asyncio.sleep(poll_s)
        return await asyncio.get_running_loop().sock_recv(sock, _RECEIVE_BYTES)
    except ConnectionError:
        return b""


async def _read(sock: socket.socket, received: bytes, sender: KafkaPredictionLog, *, poll_s: float) -> None:
    """Read frames until the end frame or EOF, each encoded and queued for the sender as it is read."""
    unpack = Unpacker()
    buffer = bytearray(received)
    while True:
        start = 0
        while len(buffer) - start >= FRAME.size:
            size, head = FRAME.unpack_from(buffer, start)
            if size == 0 and head == 0:  # END
                return
            end = start + FRAME.size + size
            if len(buffer) < end:
                break
            # A copy: nothing may keep a view of the buffer, which is cut below.
            frame = bytes(buffer[start + FRAME.size : end])
            start = end
            try:
                item = unpack(frame, head)
            except Exception as exc:
                sender.counts["unencodable"] += 1
                sender.settled += 1
                log.error("prediction log frame cannot be read", error=repr(exc))
                continue
            # Encoded at once, and only the records wait in the queue: a decoded 100-row item is ~1,500
            # objects, and a few hundred of them waiting for the sender's linger cost reading them back (the
            # body and head parsed into fresh memory, not memory just freed) and encoding them 2-3x what the
            # same work costs on one item at a time (in process: orjson.loads of the body 170 us instead of
            # 40-60 us).
            wires = sender.encode(item)
            del item
            if not wires:
                sender.settled += 1
                continue
            # Waits while the queue is full: the socket fills up and serving's hand-off drops and counts.
            await sender.queue.put(wires)
        del buffer[:start]
        chunk = await _receive(sock, poll_s)
        if not chunk:
            return
        buffer += chunk


async def _report(sock: socket.socket, sender: KafkaPredictionLog) -> None:
    # The socket is gone when serving is: nobody to report to.
    with contextlib.suppress(OSError):
        report = sender.counts | {"settled": sender.settled}
        await asyncio.get_running_loop().sock_sendall(sock, orjson.dumps(report) + b"\n")


async def produce(fd: int, parent: int) -> None:
    """Read frames from serving's socket and produce them until the end frame, EOF or the parent's death;
    flush (bounded) and exit the process."""
    sock = socket.socket(fileno=fd)
    config, received = _read_config(sock)
    sock.setblocking(False)
    configure_logging("serving-predictions", level=config["log_level"], json=config["log_json"])
    sender = KafkaPredictionLog(
        KafkaSettings(**config["kafka"]),
        source=config["source"],
        buffer=config["buffer"],
        batch=config["batch"],
        linger_ms=config["linger_ms"],
        yield_between_items=False,
    )
    # Everything imported so far lives as long as the process: keep it out of the collector's full passes,
    # which otherwise scan it every few hundred items.
    gc.freeze()
    orphaned = asyncio.Event()

    def on_term() -> None:
        # serving's whole process group may get SIGTERM: while serving lives, it closes the socket when
        # it has handed everything over; only a dead parent means stop now.
        if os.getppid() != parent:
            orphaned.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    sending = asyncio.create_task(sender.run())
    reading = asyncio.create_task(_read(sock, received, sender, poll_s=config["poll_s"]))
    await _report(sock, sender)  # tells serving this process runs
    watching = asyncio.create_task(orphaned.wait())
    while not reading.done() and not watching.done() and not sending.done():
        await asyncio.wait(
            [reading, watching, sending], timeout=_REPORT_S, return_when=asyncio.FIRST_COMPLETED
        )
        await _report(sock, sender)
    reading.cancel()
    watching.cancel()
    await sender.stop()
    # Not wait_for: cancelling a sender whose producer cannot reach the broker can hang in its cleanup.
    await asyncio.wait([sending], timeout=config["stop_timeout_s"])
    if not sending.done():
        left = 0
        while not sender.queue.empty():
            wires = sender.queue.get_nowait()
            left += len(wires) if isinstance(wires, list) else 1
            sender.settled += 1
        sender.counts["send-failed"] += left
        log.error("prediction log not flushed in time", left=left)
    elif sending.exception() is not None:
        log.error("prediction log sender failed", error=repr(sending.exception()))
    await _report(sock, sender)
    sock.close()
    # Exit here, not through the loop's shutdown, which would wait for a sender stuck on an unreachable
    # broker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """``python -m services.serving.adapters.log_producer <socket fd> <parent pid>``, started by serving."""
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C stops serving, which stops this
    _die_with_parent(parent)
    import uvloop

    uvloop.run(produce(fd, parent))


if __name__ == "__main__":
    main()
