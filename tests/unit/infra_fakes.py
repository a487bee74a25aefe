"""The local infrastructure with fake Kafka and Postgres, for the unit tests of the commands and leases:
the real LocalInfra (its locks and leases are real, on a state folder of the test's) around components
that only note whether they run."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local import infra as infra_module
from deploy.local.infra import LocalInfra
from deploy.local.settings import LocalInfraSettings
from deploy.local.status import ComponentStatus


class FakeComponent:
    """Kafka or Postgres: runs once started, until stopped; notes each stop in ``stops``."""

    bootstrap = "127.0.0.1:19092"
    url = "postgresql://driftloop@127.0.0.1:54329/driftloop"

    def __init__(self, name: str, stops: list[str]) -> None:
        self.name = name
        self.stops = stops
        self.running = False

    def preflight(self) -> None:
        pass

    def running_pid(self) -> int | None:
        return 1 if self.running else None

    def start(self) -> bool:
        started, self.running = not self.running, True
        return started

    def stop(self) -> bool:
        if not self.running:
            return False
        self.running = False
        self.stops.append(self.name)
        return True

    def status(self) -> ComponentStatus:
        return ComponentStatus(self.name, "ready" if self.running else "stopped", self.running, "127.0.0.1:9")


class FakeInfra:
    """A LocalInfra on ``state`` with fake Kafka and Postgres; ``stopped`` lists their stops in order."""

    def __init__(self, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # The fakes, not a broker or database the test run was given; no topics to create on them.
        monkeypatch.delenv("DRIFTLOOP_KAFKA_BOOTSTRAP", raising=False)
        monkeypatch.delenv("DRIFTLOOP_DATABASE_URL", raising=False)
        monkeypatch.setattr(infra_module, "create_platform_topics", lambda *args, **kwargs: [])
        self.stopped: list[str] = []
        self.kafka = FakeComponent("kafka", self.stopped)
        self.postgres = FakeComponent("postgres", self.stopped)
        self.local = LocalInfra(LocalInfraSettings(state_dir=state))
        self.local.broker = self.kafka  # type: ignore[assignment]
        self.local.postgres = self.postgres  # type: ignore[assignment]

    def runs(self) -> bool:
        """Whether Kafka and Postgres both run."""
        return self.kafka.running and self.postgres.running
