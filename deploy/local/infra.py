"""The local infrastructure as one unit: which broker and database to use, bringing them up and down."""

from __future__ import annotations

import os
from dataclasses import dataclass

from deploy.local.broker import ExternalKafka, KafkaBroker, broker_answers, create_platform_topics
from deploy.local.console import say
from deploy.local.interrupts import DeferredSignals
from deploy.local.postgres import ExternalPostgres, LocalPostgres, database_answers
from deploy.local.processes import exclusive
from deploy.local.settings import LocalInfraSettings, StateLayout
from deploy.local.status import ComponentStatus
from libs.settings import KafkaSettings

KAFKA_ENV = "DRIFTLOOP_KAFKA_BOOTSTRAP"
DATABASE_ENV = "DRIFTLOOP_DATABASE_URL"


@dataclass(frozen=True)
class UpResult:
    """What `up` did: which components it started now, and where clients find them."""

    started: tuple[str, ...]
    kafka_bootstrap: str
    database_url: str

    def client_env(self) -> dict[str, str]:
        """The environment variables that point services and tests at this infrastructure."""
        return {KAFKA_ENV: self.kafka_bootstrap, DATABASE_ENV: self.database_url}


class LocalInfra:
    """Kafka and Postgres for this checkout: the user's own when given by URL, else the project's."""

    def __init__(self, settings: LocalInfraSettings | None = None) -> None:
        self.settings = settings or LocalInfraSettings()
        self.layout = StateLayout.from_settings(self.settings)
        self.broker = KafkaBroker(self.settings, self.layout)
        self.postgres = LocalPostgres(self.settings, self.layout)

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

    def up(self, components: tuple[str, ...] = ("kafka", "postgres")) -> UpResult:
        """Make sure broker and database run and answer, and the platform topics exist.

        A component counts as started the moment we set out to start it: a failure or Ctrl-C while it
        comes up (Kafka's 90 s readiness wait, pg_ctl's) stops it again with everything else started here.
        """
        # One up/down at a time per checkout: a test session and a terminal may race otherwise.
        with exclusive(self.layout.lock_file):
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

    def down(self, components: tuple[str, ...] = ("kafka", "postgres")) -> list[str]:
        """Stop our own broker and cluster (never external ones); returns what was running."""
        with exclusive(self.layout.lock_file):
            return self._stop(components)

    def status(self) -> list[ComponentStatus]:
        """One status row per component, external ones included."""
        kafka = self.external_kafka()
        database = self.external_postgres()
        return [
            kafka.status() if kafka else self.broker.status(),
            database.status() if database else self.postgres.status(),
        ]
