"""The faults: SIGKILL of service processes at random moments, and restarts of the broker and Postgres.

Every choice comes from one seeded random generator, printed at the start, so a failing run can be
replayed with DRIFTLOOP_CHAOS_SEED (the moments still depend on the machine's speed, the choices do not).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contracts.audit import AuditCheckpoint
from contracts.feedback import GroundTruthReceived
from contracts.monitoring import DataQualityIssue
from contracts.predictions import PredictionsLogged
from contracts.topics import TOPICS
from deploy.local.infra import LocalInfra
from deploy.loop import EventTail
from deploy.platform import SERVICES, Platform

# Telemetry flows all the time: killing on it would mostly kill monitoring. The kills that wait for an
# event wait for a step of a cascade.
TELEMETRY = (PredictionsLogged, GroundTruthReceived, AuditCheckpoint, DataQualityIssue)
RECOVER_S = 8.0  # a killed service is left alone this long, so it can come back and do some work


def consumers_of(event_type: type) -> tuple[str, ...]:
    """The services that handle events of this payload type (audit records everything: left out)."""
    routes = [r for spec in TOPICS.values() for r in spec.routes if r.event is event_type]
    return tuple(sorted({c for r in routes for c in r.consumers} - {"audit"}))


@dataclass
class Fault:
    """One fault done: when (seconds since the chaos started), what, and to which process."""

    at_s: float
    what: str
    target: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.at_s:7.1f}s {self.what:<16} {self.target:<10} {self.detail}"


@dataclass
class Chaos:
    """Kills services at random moments, some just as an event they handle arrives, and restarts the
    broker and Postgres once each, at random points among the kills."""

    platform: Platform
    infra: LocalInfra
    tail: EventTail
    rng: random.Random
    min_kills: int = 20
    gap_s: tuple[float, float] = (1.5, 4.0)
    budget_s: float = 150.0
    """Once the planned faults are done, no new ones after this long: the cascades still running must then
    finish on a platform that has recovered (faults every few seconds forever would be a livelock, not a
    test: monitoring rebuilds a canary's window after each restart)."""
    faults: list[Fault] = field(default_factory=list)
    _killed_pids: set[int] = field(default_factory=set)
    _last_kill: dict[str, float] = field(default_factory=dict)
    _started: float = 0.0

    @property
    def kills(self) -> list[Fault]:
        return [f for f in self.faults if f.what == "SIGKILL"]

    def enough(self) -> bool:
        return len(self.kills) >= self.min_kills and {"restart broker", "restart postgres"} <= {
            f.what for f in self.faults
        }

    async def run(self, stop: Callable[[], bool]) -> None:
        """Inject faults until the planned ones are done and ``stop()`` says so or the budget is spent."""
        self._started = time.monotonic()
        broker_after = self.rng.randint(3, 7)
        postgres_after = self.rng.randint(10, 15)
        while not (self.enough() and (stop() or time.monotonic() - self._started > self.budget_s)):
            await asyncio.sleep(self.rng.uniform(*self.gap_s))
            done = {f.what for f in self.faults}
            if len(self.kills) >= broker_after and "restart broker" not in done:
                await self._restart("broker", "kafka")
            elif len(self.kills) >= postgres_after and "restart postgres" not in done:
                await self._restart("postgres", "postgres")
            elif self.rng.random() < 0.5:
                await self._kill_on_next_step()
            else:
                await self._kill(self.rng.choice(SERVICES), "at a random moment")

    async def _kill_on_next_step(self) -> None:
        # Just as a service is handed a step of a cascade: where exactly-once matters most.
        seen = len(self.tail.seen)
        deadline = time.monotonic() + self.gap_s[1]
        while time.monotonic() < deadline:
            for s in self.tail.seen[seen:]:
                handlers = consumers_of(type(s.event.data))
                if not isinstance(s.event.data, TELEMETRY) and handlers:
                    await asyncio.sleep(self.rng.uniform(0.0, 0.3))
                    name = type(s.event.data).__name__
                    await self._kill(self.rng.choice(handlers), f"as it handles {name}")
                    return
            seen = len(self.tail.seen)
            await asyncio.sleep(0.05)  # the tail has no per-event signal to wait on
        await self._kill(self.rng.choice(SERVICES), "at a random moment (no cascade step came)")

    async def _kill(self, service: str, why: str) -> None:
        now = time.monotonic()
        up = [s for s in SERVICES if self._live_pid(s) and now - self._last_kill.get(s, -1e9) > RECOVER_S]
        if service not in up:  # down, or killed a moment ago: take another that is up
            if not up:
                return
            service = self.rng.choice(up)
        pid = self._live_pid(service)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self._killed_pids.add(pid)
        self._last_kill[service] = now
        self._note("SIGKILL", service, f"pid {pid}, {why}")

    def _live_pid(self, service: str) -> int | None:
        pid = self.platform.state().get(service, {}).get("pid")
        if pid is None or pid in self._killed_pids:
            return None
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if f"services.{service}".encode() in command else None

    async def _restart(self, label: str, component: str) -> None:
        down_s = self.rng.uniform(1.0, 4.0)
        started = time.monotonic()
        await asyncio.to_thread(self.infra.down, (component,))
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.infra.up, (component,))
        self._note(f"restart {label}", component, f"down {time.monotonic() - started:.1f}s in all")

    def _note(self, what: str, target: str, detail: str) -> None:
        fault = Fault(time.monotonic() - self._started, what, target, detail)
        self.faults.append(fault)
        print(f"chaos: {fault}", flush=True)
