"""The local infrastructure as one unit: which broker and database to use, bringing them up and down."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from deploy.local.broker import ExternalKafka, KafkaBroker, broker_answers, create_platform_topics
from deploy.local.console import say
from deploy.local.interrupts import DeferredSignals
from deploy.local.leases import Holder, Lease, Leases
from deploy.local.postgres import ExternalPostgres, LocalPostgres, database_answers
from deploy.local.processes import exclusive
from deploy.local.settings import LocalInfraSettings, StateLayout
from deploy.local.status import ComponentStatus
from libs.settings import KafkaSettings

KAFKA_ENV = "DRIFTLOOP_KAFKA_BOOTSTRAP"
DATABASE_ENV = "DRIFTLOOP_DATABASE_URL"
INFRASTRUCTURE = ("kafka", "postgres")
PLATFORM = "platform"
EVERYTHING = (*INFRASTRUCTURE, PLATFORM)


@dataclass(frozen=True)
class UpResult:
    """What `up` did: which components it started now, and where clients find them."""

    started: tuple[str, ...]
    kafka_bootstrap: str
    database_url: str

    def client_env(self) -> dict[str, str]:
        """The environment variables that point services and tests at this infrastructure."""
        return {KAFKA_ENV: self.kafka_bootstrap, DATABASE_ENV: self.database_url}


class RunsOnInfrastructure(Protocol):
    """This checkout's platform, as the end of a lease sees it: it runs on the infrastructure, so it is
    stopped before it, and infrastructure it runs on stays."""

    def supervisor_pid(self) -> int | None:
        """The supervisor's pid while the platform runs."""
        ...

    def stop(self) -> bool:
        """Stop the platform; True if it ran."""
        ...


@dataclass(frozen=True)
class LeaseEnd:
    """What the end of a lease (or a look for what ended commands left) did, and why the rest stays."""

    listed: frozenset[str]
    """What lease holders had started and no one had taken over, as listed when the lease ended."""
    stopped: tuple[str, ...]
    """What was stopped now: what lease holders started and no live one uses."""
    left_running: tuple[str, ...]
    """What lease holders started that runs and stays running."""
    users: tuple[Holder, ...]
    """The live lease holders."""
    platform_pid: int | None = None
    """The supervisor of a platform that runs on the infrastructure, which therefore stays."""


class InfraLease:
    """One command's use of the local infrastructure (and of this checkout's platform) from its start to
    its end: what it starts is stopped by the last command using it, not by the first to end."""

    def __init__(self, infra: LocalInfra, lease: Lease) -> None:
        self.infra = infra
        self.lease = lease
        self.started: list[str] = []
        """What this command started (each also on the shared list, for the last holder to stop)."""
        self.kept = False

    def up(self, components: tuple[str, ...] = INFRASTRUCTURE) -> UpResult:
        """``LocalInfra.up`` for this command: what it starts is noted as lease holders' to stop."""
        result = self.infra.up(components, lease=self)
        self.started.extend(result.started)
        return result

    def note_started(self, thing: str) -> None:
        """Note that this command started ``thing`` (the platform), for the last holder to stop."""
        with exclusive(self.infra.layout.lock_file, f"noting that it started {thing}"):
            self.infra.leases.add_started([thing])
        self.started.append(thing)

    def end(self, platform: RunsOnInfrastructure | None, why: str | None = None) -> LeaseEnd:
        """Give the lease up; see ``LocalInfra.stop_unused``."""
        return self.infra.stop_unused(platform, why, ending=self.lease)

    def keep(self) -> None:
        """What this and the other lease holders started stays running after they end (``LocalInfra.keep``):
        an `up` that got ready, a `demo --keep-running`."""
        self.infra.keep()
        self.kept = True

    def taken_over(self, end: LeaseEnd) -> list[str]:
        """What this command started that another, keeping it running, took over (``LocalInfra.keep``)."""
        return [] if self.kept else [thing for thing in self.started if thing not in end.listed]


class LocalInfra:
    """Kafka and Postgres for this checkout: the user's own when given by URL, else the project's."""

    def __init__(self, settings: LocalInfraSettings | None = None) -> None:
        self.settings = settings or LocalInfraSettings()
        self.layout = StateLayout.from_settings(self.settings)
        self.broker = KafkaBroker(self.settings, self.layout)
        self.postgres = LocalPostgres(self.settings, self.layout)
        self.leases = Leases(self.layout.leases)

    def lease(self, command: str, uses: Iterable[str] = INFRASTRUCTURE) -> InfraLease:
        """A lease for ``command`` (``driftloop test``), which uses ``uses`` until it ends the lease or dies:
        meanwhile no other command's end stops any of it."""
        with exclusive(self.layout.lock_file, "taking a lease"):
            return InfraLease(self, self.leases.take(command, uses))

    def users(self) -> list[Holder]:
        """The live commands holding a lease (no up/down lock: a status must not wait for an `up`)."""
        return self.leases.holders()

    def keep(self, things: Iterable[str] = EVERYTHING) -> list[str]:
        """What lease holders started of ``things`` stays running after they end: an `infra up`, an `up`
        that got ready, a `demo --keep-running` took it over (`down` stops it). Returns what it took."""
        with exclusive(self.layout.lock_file, "taking over what running commands started"):
            taken = sorted(self.leases.started() & set(things))
            self.leases.forget(taken)
            return taken

    def stop_unused(
        self,
        platform: RunsOnInfrastructure | None,
        why: str | None = None,
        *,
        ending: Lease | None = None,
    ) -> LeaseEnd:
        """End the lease ``ending``, if given, then stop what lease holders started and no live one uses:
        the platform first (when ``platform`` is given), then Kafka and Postgres unless a platform still
        runs on them. Says ``why`` (or which) before it stops anything.

        One holder's end never stops what another still uses; the last one's stops what any of them
        started, a dead one's too (its lease ended with its process). Without ``ending``, it stops what
        commands that have ended left running (one killed with SIGKILL).
        """
        with exclusive(self.layout.lock_file, "stopping what no running command uses"):
            if ending is not None:
                ending.close()
            users = self.leases.holders()
            started = self.leases.started()

            def unused(thing: str) -> bool:
                return thing in started and not any(user.needs(thing) for user in users)

            def runs(thing: str) -> bool:
                if thing == PLATFORM:  # unknown without the platform: it may run
                    return platform is None or platform.supervisor_pid() is not None
                component = self.broker if thing == self.broker.name else self.postgres
                return component.running_pid() is not None

            stop_platform = platform is not None and unused(PLATFORM)
            platform_pid = None
            if platform is not None and not stop_platform:
                platform_pid = platform.supervisor_pid()
            # A platform that stays runs on the infrastructure (one only noted as started may run too).
            platform_stays = platform_pid is not None or (PLATFORM in started and not stop_platform)
            components = [c for c in INFRASTRUCTURE if unused(c) and not platform_stays]
            stopping = [PLATFORM] * stop_platform + components
            # What was stopped meanwhile (an `infra down`) is only taken off the list.
            if any(runs(thing) for thing in stopping):
                say(why or f"stopping {', '.join(filter(runs, stopping))}, which no running command uses ...")
            stopped: list[str] = []
            try:
                if platform is not None and stop_platform:
                    if platform.stop():
                        stopped.append(PLATFORM)
                    self.leases.forget([PLATFORM])
            finally:
                # The infrastructure is stopped even when stopping the platform failed.
                stopped.extend(self._stop(components))
                self.leases.forget(components)
            return LeaseEnd(
                listed=started,
                stopped=tuple(stopped),
                left_running=tuple(sorted(t for t in started if t not in stopping and runs(t))),
                users=tuple(users),
                platform_pid=platform_pid if platform_stays else None,
            )

    def external_kafka(self, *, announce: bool = False) -> ExternalKafka | None:
        """The broker named by DRIFTLOOP_KAFKA_BOOTSTRAP when it is set and answers."""
        bootstrap = os.environ.get(KAFKA_ENV)
        if not bootstrap or bootstrap == self.broker.bootstrap:
            return None
        if broker_answers(bootstrap):
            if announce:
                say(f"using the Kafka broker from {KAFKA_ENV} ({bootstrap})")
            return ExternalKafka(bootstrap)
        if announce:
            say(f"{KAFKA_ENV}={bootstrap} does not answer; using the project's own broker instead")
        return None

    def external_postgres(self, *, announce: bool = False) -> ExternalPostgres | None:
        """The database named by DRIFTLOOP_DATABASE_URL when it is set and answers."""
        url = os.environ.get(DATABASE_ENV)
        if not url or url == self.postgres.url:
            return None
        if database_answers(url):
            if announce:
                say(f"using the database from {DATABASE_ENV}")
            return ExternalPostgres(url)
        if announce:
            say(f"{DATABASE_ENV} is set but does not answer; using the project's own Postgres instead")
        return None

    def up(
        self, components: tuple[str, ...] = INFRASTRUCTURE, *, lease: InfraLease | None = None
    ) -> UpResult:
        """Make sure broker and database run and answer, and the platform topics exist.

        A component counts as started the moment we set out to start it: a failure or Ctrl-C while it
        comes up (Kafka's 90 s readiness wait, pg_ctl's) stops it again with everything else started here.
        Under a ``lease`` it is noted then as lease holders' to stop (see ``stop_unused``), so one whose
        command is killed with SIGKILL meanwhile is stopped by the last holder all the same.
        """
        # One up/down at a time per checkout: a test session and a terminal may race otherwise.
        with exclusive(self.layout.lock_file, f"starting {' and '.join(components)}"):
            kafka = self.external_kafka(announce=True) if "kafka" in components else None
            database = self.external_postgres(announce=True) if "postgres" in components else None
            local_kafka = "kafka" in components and kafka is None
            local_postgres = "postgres" in components and database is None
            # Check everything before starting anything, so a taken port does not leave half a stack behind.
            if local_kafka:
                self.broker.preflight()
            if local_postgres:
                self.postgres.preflight()
            started: list[str] = []

            def bring_up(component: LocalPostgres | KafkaBroker) -> None:
                if component.running_pid() is None:
                    started.append(component.name)  # from here on a failure stops it
                    if lease is not None:
                        self.leases.add_started([component.name])
                if not component.start() and component.name in started:
                    started.remove(component.name)  # it was running after all

            try:
                if local_postgres:
                    bring_up(self.postgres)
                if local_kafka:
                    bring_up(self.broker)
                bootstrap = kafka.bootstrap if kafka else self.broker.bootstrap
                if "kafka" in components:
                    created = create_platform_topics(bootstrap, prefix=KafkaSettings().topic_prefix)
                    if created:
                        say(f"created topics: {', '.join(created)}")
            except BaseException:
                with DeferredSignals("stopping what this start got going"):
                    self._stop(started)
                    if lease is not None:  # no other holder can have come to use it: it joins under the lock
                        self.leases.forget(started)
                raise
            return UpResult(
                started=tuple(started),
                kafka_bootstrap=bootstrap,
                database_url=database.url if database else self.postgres.url,
            )

    def _stop(self, components: list[str] | tuple[str, ...]) -> list[str]:
        stopped = []
        try:
            if "kafka" in components and self.broker.stop():
                stopped.append(self.broker.name)
        finally:
            # Postgres is stopped even when stopping the broker failed.
            if "postgres" in components and self.postgres.stop():
                stopped.append(self.postgres.name)
        return stopped

    def down(self, components: tuple[str, ...] = INFRASTRUCTURE) -> list[str]:
        """Stop our own broker and cluster (never external ones), whoever uses them; returns what was
        running. What lease holders started stays on their list: stopping what does not run does nothing,
        and a component stopped to be started again (the chaos tests') is still theirs to stop."""
        with exclusive(self.layout.lock_file, f"stopping {' and '.join(components)}"):
            return self._stop(components)

    def status(self) -> list[ComponentStatus]:
        """One status row per component, external ones included."""
        kafka = self.external_kafka()
        database = self.external_postgres()
        return [
            kafka.status() if kafka else self.broker.status(),
            database.status() if database else self.postgres.status(),
        ]
