"""A restart's replay on the real broker: records the broker no longer holds (deleted below the offset the
replay starts from, as retention does) are reported as not replayed, and the ones it still holds are read;
records left when the deadline passed are reported too."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from contracts.registry import EVENT_TYPES
from libs.bus.kafka import KafkaPublisher
from libs.settings import KafkaSettings
from services.monitoring.adapters.replay import Request, replay_predictions
from tests.integration.kafka_tools import create_topics, unique
from tests.unit.monitoring.test_ingest_failures import logged


async def predictions_topic(bootstrap: str, publisher: KafkaPublisher, records: int, group: str) -> str:
    """A topic of ``records`` prediction events on one partition, the group's offset committed past them."""
    topic = unique("test.mon.replay")
    await create_topics(bootstrap, topic)
    events = [logged(f"r{i}") for i in range(records)]
    await publisher.send_many([(topic, *e.to_kafka()) for e in events])
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): records})
    finally:
        await consumer.stop()
    return topic


async def delete_below(bootstrap: str, topic: str, offset: int) -> None:
    """What retention does: the partition's log starts at ``offset`` from now on."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(offset)})
    finally:
        await admin.close()


async def test_records_deleted_below_the_replay_offset_are_reported_and_the_rest_replayed(
    kafka_bootstrap: str, publisher: KafkaPublisher
) -> None:
    group = unique("g_replay")
    topic = await predictions_topic(kafka_bootstrap, publisher, 10, group)
    await delete_below(kafka_bootstrap, topic, 4)
    requests: list[Request] = []

    def feed(batch: Sequence[Request]) -> None:
        requests.extend(batch)

    report = await replay_predictions(
        KafkaSettings(bootstrap=kafka_bootstrap),
        topic=topic,
        group=group,
        start={0: 0},
        registry=EVENT_TYPES,
        feed=feed,
        deadline_s=60.0,
    )

    assert [off for _, _, off in requests] == list(range(4, 10))
    assert report.deleted == {0: 4} and report.unread == {} and report.records == 6


async def test_a_replay_past_its_deadline_reports_the_records_left(
    kafka_bootstrap: str, publisher: KafkaPublisher
) -> None:
    group = unique("g_replay")
    topic = await predictions_topic(kafka_bootstrap, publisher, 10, group)

    report = await replay_predictions(
        KafkaSettings(bootstrap=kafka_bootstrap),
        topic=topic,
        group=group,
        start={0: 2},
        registry=EVENT_TYPES,
        feed=lambda _: None,
        deadline_s=1e-6,
    )

    assert report.unread == {0: 8} and report.deleted == {} and report.records == 0
