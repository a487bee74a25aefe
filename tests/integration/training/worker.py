"""A training or validation service process for the integration tests: the real service (its build, consumer,
job runner, process pool, HTTP API) reading one test topic instead of the platform topics, and relaying its
outbox to that same topic, so test runs never touch the shared mlops.* topics and training still receives its
own TrainingRequested back.

    DRIFTLOOP_TEST_TOPIC=<topic> python -m tests.integration.training.worker training|validation
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from libs.bus.kafka import KafkaPublisher
from libs.bus.postgres import OutboxRelay
from libs.service import Runtime, ServiceParts, serve


class TopicRewrite:
    """Sends outbox rows to the test topic, whatever topic their event type names."""

    def __init__(self, publisher: KafkaPublisher, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]
    ) -> None:
        await self.publisher.send_many(
            [(self.topic, key, value, headers) for _, key, value, headers in items]
        )


def main(service: str) -> None:
    topic = os.environ["DRIFTLOOP_TEST_TOPIC"]
    if service == "training":
        from services.training.bootstrap import MIGRATIONS, build
        from services.training.settings import TrainingSettings

        settings: object = TrainingSettings()
    else:
        from services.validation.bootstrap import MIGRATIONS, build
        from services.validation.settings import ValidationSettings

        settings = ValidationSettings()

    async def build_for_test(rt: Runtime) -> ServiceParts:
        parts = await build(rt, topics=[topic])
        parts.relay = False
        relay = OutboxRelay(rt.pool, rt.settings.db_schema, TopicRewrite(rt.publisher, topic), idle_s=0.5)

        async def run_relay() -> None:
            await relay.run()

        async def stop_relay() -> None:
            relay.stop()

        parts.tasks.append(run_relay)
        parts.on_stop.append(stop_relay)
        return parts

    asyncio.run(serve(settings, migrations=MIGRATIONS, build=build_for_test))  # type: ignore[arg-type]


if __name__ == "__main__":
    main(sys.argv[1])
