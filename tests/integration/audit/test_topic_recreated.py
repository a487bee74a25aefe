"""The audit service when Kafka positions are used again for other records: a topic deleted and created
again starts its offsets at 0, and the records there are new, not redeliveries of the trail's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import TopicAlreadyExistsError

from contracts.envelope import CloudEvent
from contracts.monitoring import DriftDetected
from libs.bus.kafka import KafkaPublisher
from tests.integration.audit.service_process import AuditProcess
from tests.integration.kafka_tools import create_topics, eventually, fetchval, unique
from tests.unit.audit.fakes import example


async def publish(publisher: KafkaPublisher, topic: str, events: list[CloudEvent[Any]]) -> None:
    await publisher.send_many([(topic, *e.to_kafka()) for e in events])


async def recreate(bootstrap: str, topic: str) -> None:
    """Delete this test's own topic and create it again, empty (what an operator's reset does)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])

        async def created() -> bool:
            # The broker deletes asynchronously: creating refuses until the old topic is gone.
            try:
                await create_topics(bootstrap, topic, partitions=1)
            except TopicAlreadyExistsError:
                return False
            return True

        await eventually(created, deadline_s=60, interval_s=0.5)
    finally:
        await admin.close()


@pytest.mark.parametrize("running", [False, True], ids=["stopped-meanwhile", "running-meanwhile"])
async def test_events_of_a_recreated_topic_at_offsets_the_trail_holds_are_recorded(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher, tmp_path: Path, running: bool
) -> None:
    topic = unique("test.audit.reset")
    await create_topics(kafka_bootstrap, topic, partitions=1)
    svc = AuditProcess(kafka_bootstrap, database_url, [topic], tmp_path, checkpoint_every_rows=5)
    before = [example(DriftDetected) for _ in range(5)]
    after = [example(DriftDetected) for _ in range(8)]
    svc.start()
    try:
        await svc.ready()
        await publish(publisher, topic, before)
        await eventually(lambda: _rows(svc, 5), deadline_s=60)
        if not running:
            # Stopped cleanly: the group's committed offset (5) is beyond the new log's end.
            assert svc.stop() == 0, svc.log_tail()
        await recreate(kafka_bootstrap, topic)
        # Offsets 0..7: 0..4 held by the events of `before`, 5..7 past the old log's end.
        await publish(publisher, topic, after)
        if not running:
            svc.start()
        await svc.ready()
        await eventually(lambda: _rows(svc, 13), deadline_s=60)
        stored = await fetchval(
            database_url, f"SELECT array_agg(event_id ORDER BY seq) FROM {svc.schema}.trail"
        )
        assert stored == [e.id for e in [*before, *after]]
        report = (await svc.get("/v1/verify", full="true")).json()
        assert report["ok"], report
        # Restarted again, the service reads the new topic from where it left: nothing is recorded twice.
        assert svc.stop() == 0, svc.log_tail()
        svc.start()
        await svc.ready()
        await publish(publisher, topic, [late := example(DriftDetected)])
        await eventually(lambda: _rows(svc, 14), deadline_s=60)
        stored = await fetchval(
            database_url, f"SELECT array_agg(event_id ORDER BY seq) FROM {svc.schema}.trail"
        )
        assert stored == [e.id for e in [*before, *after, late]]
        assert svc.stop() == 0, svc.log_tail()
    finally:
        if svc.proc is not None:
            svc.kill()
        await svc.drop_schema()


async def _rows(svc: AuditProcess, n: int) -> bool:
    assert svc.proc is None or svc.proc.poll() is None, svc.log_tail()
    return await svc.rows() >= n
