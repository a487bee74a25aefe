"""A restart's replay of the predictions topic reads every partition up to the group's committed offset: an
empty poll (a slow broker, a fetch held up) is no end, an overall deadline is. What it could not read (the
deadline passed, or the broker no longer holds the records) is logged, counted and reported."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.envelope import EventTypeRegistry
from contracts.predictions import PredictionsLogged
from services.monitoring.adapters.replay import Request, replay
from services.monitoring.ports import ReplayReport
from tests.unit.monitoring.test_ingest_failures import logged

TOPIC = "mlops.predictions"


@dataclass
class Message:
    partition: int
    offset: int
    value: bytes
    headers: list[tuple[str, bytes]]


class Broker:
    """The predictions topic as a replay's consumer sees it: per partition its records, the group's committed
    offset, and polls that come back empty (``stalls``: the polls, counted from 1, that find nothing). Each
    poll takes a second of the replay's clock. Records can be deleted below an offset (retention): a fetch
    below it fails, as aiokafka's does with ``auto_offset_reset="none"``."""

    def __init__(
        self, records: dict[int, int], committed: dict[int, int], stalls: frozenset[int] = frozenset()
    ) -> None:
        self.log: dict[int, list[Message]] = {}
        for partition, n in records.items():
            self.log[partition] = []
            for offset in range(n):
                _, value, headers = logged(f"p{partition}-o{offset}").to_kafka()
                self.log[partition].append(Message(partition, offset, value, list(headers)))
        self.commits = committed
        self.stalls = set(stalls)
        self.positions: dict[TopicPartition, int] = {}
        self.polls = 0
        self.now = 0.0
        self.delete_at: dict[int, tuple[int, int]] = {}  # at poll n: delete partition p's records below o

    def clock(self) -> float:
        return self.now

    def delete_below(self, partition: int, offset: int) -> None:
        self.log[partition] = [m for m in self.log[partition] if m.offset >= offset]

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._first(tp.partition) for tp in partitions}

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {
            tp: self.log[tp.partition][-1].offset + 1 if self.log[tp.partition] else 0 for tp in partitions
        }

    def _first(self, partition: int) -> int:
        return self.log[partition][0].offset if self.log[partition] else 0

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.commits.get(tp.partition)

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(partitions, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[Message]]:
        self.polls += 1
        self.now += 1.0
        if self.polls in self.delete_at:
            self.delete_below(*self.delete_at[self.polls])
        if self.polls in self.stalls:
            return {}
        out: dict[TopicPartition, list[Message]] = {}
        for tp in partitions:
            at = self.positions[tp]
            if at < self._first(tp.partition):
                raise OffsetOutOfRangeError({tp: at})
            got = [m for m in self.log[tp.partition] if m.offset >= at][:2]  # two records a fetch
            if got:
                out[tp] = got
                self.positions[tp] = got[-1].offset + 1
        return out


def fed() -> tuple[list[Request], Any]:
    requests: list[Request] = []

    def feed(batch: Sequence[Request]) -> None:
        requests.extend(batch)

    return requests, feed


async def run(broker: Broker, start: dict[int, int], deadline_s: float = 600.0) -> tuple[ReplayReport, list]:
    requests, feed = fed()
    report = await replay(
        broker,
        topic=TOPIC,
        start=start,
        registry=EventTypeRegistry([PredictionsLogged]),
        feed=feed,
        max_event_bytes=1_000_000,
        deadline_s=deadline_s,
        clock=broker.clock,
    )
    return report, sorted((part, off) for _, part, off in requests)


def not_replayed(reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "driftloop_monitoring_replay_records_not_replayed_total", {"reason": reason}
        )
        or 0.0
    )


async def test_an_empty_poll_does_not_end_the_replay_before_every_partition_reached_its_end() -> None:
    broker = Broker({0: 6, 1: 6}, committed={0: 6, 1: 5}, stalls=frozenset({2, 3}))

    report, read = await run(broker, {0: 0, 1: 1})

    assert read == [(0, o) for o in range(6)] + [(1, o) for o in range(1, 5)]
    assert report.complete and report.records == 10


async def test_the_replay_stops_at_its_deadline_and_reports_what_it_did_not_read() -> None:
    # Every poll after the first finds nothing (a broker too slow to answer): the deadline ends the replay.
    broker = Broker({0: 6, 1: 6}, committed={0: 6, 1: 6}, stalls=frozenset(range(2, 1_000)))
    before = not_replayed("deadline")

    with capture_logs() as logs:
        report, read = await run(broker, {0: 0, 1: 0}, deadline_s=30.0)

    assert read == [(0, 0), (0, 1), (1, 0), (1, 1)] and report.records == 4
    assert report.unread == {0: 4, 1: 4} and report.deleted == {} and not report.complete
    assert 29.0 <= broker.now <= 31.0
    assert not_replayed("deadline") == before + 8
    assert report.public()["not_replayed"] == {"deadline": {"0": 4, "1": 4}, "deleted": {}}
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["past_deadline"] == {"0": 4, "1": 4} and warning["topic"] == TOPIC


async def test_records_deleted_before_or_while_replaying_are_counted_and_the_ones_held_are_read() -> None:
    broker = Broker({0: 10, 1: 10}, committed={0: 10, 1: 10})
    broker.delete_below(0, 3)  # before the replay: retention passed the saved offset
    broker.delete_at = {2: (1, 6)}  # while replaying: partition 1 read up to 2, then deleted below 6
    before = not_replayed("deleted")

    report, read = await run(broker, {0: 1, 1: 0})

    assert read == [(0, o) for o in range(3, 10)] + [(1, 0), (1, 1)] + [(1, o) for o in range(6, 10)]
    assert report.deleted == {0: 2, 1: 4} and report.unread == {} and not report.complete
    assert not_replayed("deleted") == before + 6


async def test_a_committed_offset_past_the_end_of_the_log_is_not_waited_for() -> None:
    # The log was truncated (or the topic made anew) below the group's committed offset: those records
    # will never come, and the replay does not wait for them until its deadline.
    broker = Broker({0: 4}, committed={0: 9})

    report, read = await run(broker, {0: 0})

    assert read == [(0, o) for o in range(4)]
    assert report.deleted == {0: 5} and broker.now < 5
