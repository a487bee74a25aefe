"""Latency of GET one model version over HTTP at a fixed arrival rate, against the app's own floor.

Open loop: request i is due at start + i/rate whatever happened to earlier ones, so a stall shows up in
the percentiles instead of silently lowering the rate (no coordinated omission). Its latency is measured
from the moment this client woke to send it (a wait for a free connection included), and the client's
own lateness (how long after the due time it woke) is printed apart: asyncio's timers wake through
epoll, whose timeout is whole milliseconds, so they fire 0-1.3 ms late on an idle machine (p50 0.7 ms,
p99 1.3 ms on 2026-12-01), an error of the client's timer rather than a wait for the server. Measured
from the due time instead (``--from-due``), that error is in every number, the floor's too. Two schedules
run side by side, interleaved in the same seconds:

  target    GET /v1/models/<model>/versions/<version> at --rate (auth, one Postgres round trip, the
            version with lineage, stage history and validation reports)
  baseline  GET /health/live at --baseline-rate (the same server, HTTP stack only: no auth, no database)

so both see the same machine at the same moments (this machine's 2 cores are shared, and a neighbour's
burst would otherwise land in one phase only), and the ratio target/baseline for p50 and p99. It also
prints how busy the machine was: all CPU, and the share of this client and the server (--server-pid).
It only talks to a registry on loopback, sends at most (rate + baseline-rate) * duration requests, and
stops by itself.

    .venv/bin/python bench/registry/get_version.py --model churn-demo --version 1 --rate 200 --duration 60 \
        --server-pid "$(cat .driftloop/registry.pid)"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx


def percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(sorted_ms) - 1, round(p / 100 * len(sorted_ms) + 0.5) - 1))
    return sorted_ms[index]


class Connections:
    """Keep-alive HTTP/1.1 connections with a request writer and a response reader small enough that the
    load generator costs far less CPU than the server it measures (an httpx request costs about as much
    as the server's own work, and both share the same 2 cores)."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.freed = asyncio.Condition()

    async def get(self, request: bytes) -> tuple[int, int]:
        """Send one GET; returns (status, body bytes)."""
        async with self.freed:
            while not self.idle and self.opened >= self.limit:
                await self.freed.wait()
            conn = self.idle.pop() if self.idle else None
            if conn is None:
                self.opened += 1
        if conn is None:
            conn = await asyncio.open_connection(self.host, self.port)
            return await self._exchange(conn, request)
        try:
            return await self._exchange(conn, request)
        except (asyncio.IncompleteReadError, ConnectionError):
            # The server closed a connection that sat idle past its keep-alive: reconnect, as clients do.
            conn[1].close()
            return await self._exchange(await asyncio.open_connection(self.host, self.port), request)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> tuple[int, int]:
        reader, writer = conn
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        async with self.freed:
            self.idle.append(conn)
            self.freed.notify()
        return status, length

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def phase(
    conns: Connections, request: bytes, rate: float, duration: float, *, from_due: bool = False
) -> dict[str, Any]:
    """Send ``rate * duration`` GETs on a fixed schedule; latencies in ms from the moment each was woken to
    be sent (from its due time with ``from_due``), and the client's lateness in waking."""
    count = int(rate * duration)
    latencies: list[float] = []
    lateness: list[float] = []
    errors: dict[int | str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(i: int) -> None:
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        woke = loop.time()
        lateness.append((woke - due) * 1000)
        try:
            status, _ = await conns.get(request)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        if status != 200:
            errors[status] = errors.get(status, 0) + 1
            return
        latencies.append((loop.time() - (due if from_due else max(due, woke))) * 1000)

    wall = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    wall = time.monotonic() - wall
    latencies.sort()
    lateness.sort()
    nan = float("nan")
    return {
        "sent": count,
        "ok": len(latencies),
        "errors": errors,
        "achieved_rps": count / wall,
        "p50": percentile(latencies, 50) if latencies else nan,
        "p90": percentile(latencies, 90) if latencies else nan,
        "p99": percentile(latencies, 99) if latencies else nan,
        "max": latencies[-1] if latencies else nan,
        "mean": statistics.fmean(latencies) if latencies else nan,
        "late_p50": percentile(lateness, 50) if lateness else nan,
        "late_p99": percentile(lateness, 99) if lateness else nan,
    }


def request_bytes(host: str, path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Accept: application/json\r\n\r\n".encode()


def show(name: str, r: dict[str, Any]) -> None:
    print(
        f"{name:9} {r['ok']:>6}/{r['sent']:<6} ok  {r['achieved_rps']:7.1f} req/s  "
        f"p50 {r['p50']:6.2f} ms  p90 {r['p90']:6.2f} ms  p99 {r['p99']:6.2f} ms  max {r['max']:7.2f} ms"
        + (f"  errors {r['errors']}" if r["errors"] else "")
        + f"  (client woke late p50 {r['late_p50']:.2f} / p99 {r['late_p99']:.2f} ms)"
    )


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8101", help="the registry (loopback only)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--token", default="dev-viewer")
    parser.add_argument("--rate", type=float, default=200.0, help="GETs of the version per second")
    parser.add_argument("--baseline-rate", type=float, default=50.0, help="GETs of /health/live per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured (at most 300)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured traffic first")
    parser.add_argument("--server-pid", type=int, default=None, help="the registry's pid, for its CPU share")
    parser.add_argument(
        "--from-due",
        action="store_true",
        help="measure latency from each request's due time, the client's timer error included",
    )
    args = parser.parse_args()
    url = httpx.URL(args.url)
    if url.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("this benchmark only targets a registry on this machine (loopback)")
    duration = min(args.duration, 300.0)
    auth = {"Authorization": f"Bearer {args.token}"}
    target = f"/v1/models/{args.model}/versions/{args.version}"

    async with httpx.AsyncClient(timeout=10) as client:
        check = await client.get(f"{args.url}{target}", headers=auth)
    if check.status_code != 200:
        raise SystemExit(f"GET {target} answered {check.status_code}: {check.text[:200]}")
    print(
        f"GET {target} ({len(check.content)} bytes) at {args.rate:.0f}/s and GET /health/live at "
        f"{args.baseline_rate:.0f}/s, side by side for {duration:.0f} s"
    )
    conns = Connections(url.host, url.port or 80, limit=64)
    version_request = request_bytes(url.host, target, args.token)
    health_request = request_bytes(url.host, "/health/live", None)
    try:
        await phase(conns, version_request, args.rate, args.warmup)
        busy0, total0 = machine_cpu()
        me0 = process_cpu(os.getpid())
        server0 = process_cpu(args.server_pid) if args.server_pid else 0.0
        result, baseline = await asyncio.gather(
            phase(conns, version_request, args.rate, duration, from_due=args.from_due),
            phase(conns, health_request, args.baseline_rate, duration, from_due=args.from_due),
        )
        busy1, total1 = machine_cpu()
        me = process_cpu(os.getpid()) - me0
        server = process_cpu(args.server_pid) - server0 if args.server_pid else None
    finally:
        conns.close()
    show("target", result)
    show("baseline", baseline)
    print(
        f"ratio target/baseline: p50 {result['p50'] / baseline['p50']:.2f}x, "
        f"p99 {result['p99'] / baseline['p99']:.2f}x; target p99 {result['p99']:.2f} ms "
        f"({'meets' if result['p99'] <= 5.0 else 'misses'} the 5 ms goal)"
    )
    cores = os.cpu_count() or 1
    wall = (total1 - total0) / cores
    used = (busy1 - busy0) / wall
    line = f"machine: {used:.2f} of {cores} cores busy during the run; this client {me / wall:.2f} cores"
    if server is not None:
        line += (
            f", the registry {server / wall:.2f} cores "
            f"({server / (result['ok'] + baseline['ok']) * 1000:.2f} ms CPU per request)"
        )
    print(line + f"; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
