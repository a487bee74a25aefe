"""A label that comes before its prediction waits, in Postgres (``pending_labels``) and in memory
(``LiveState.pending_labels``, which tells the predictions consumer which ids to look for), one per prediction
and model named, the latest replacing the one waiting. When its prediction comes, the background joins it in a
transaction of its own. The two consumers run side by side, each in its own transaction: a prediction consumed
while its label's transaction is still open misses the label, and the next tick makes the join. Memory
follows what is committed: a tick whose transaction fails leaves its expired labels waiting, and a join or an
expiry leaves waiting a label stored again while it ran (no join is made while its label is being stored). A
later label for a prediction joined before replaces its label (a correction). Labels joined side by side score
each labelled row into one performance window."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.envelope import CloudEvent, EventTypeRegistry, new_event
from contracts.feedback import GroundTruthReceived
from contracts.predictions import PredictionsLogged
from libs.bus import Delivery, InMemoryBus, Record
from libs.bus.memory import MemoryTransaction
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor, subscriptions
from services.monitoring.handlers import Monitor, Tally, on_ground_truth_received, on_predictions_logged
from services.monitoring.ports import (
    JoinedLabel,
    LabelledRecord,
    MonitoringStore,
    PendingLabel,
    PerformanceState,
    ReplayReport,
)
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import NoPolicies
from tests.unit.monitoring.test_domain import reference
from tests.unit.monitoring.test_ingest_failures import logged, predictions_bus

NOW = 1_000.0  # the tick's clock: no window is idle, no label has waited long

Pair = tuple[str, str]  # (prediction id, the model the label names)
Join = tuple[str, str, int]  # a joined prediction: (its id, model, version)
Version = tuple[str, int]


@dataclass
class Waiting:
    label: PendingLabel
    received_at: datetime


class Tables:
    """``pending_labels`` and ``labelled`` as Postgres keeps them, between transactions."""

    def __init__(self) -> None:
        self.pending: dict[Pair, Waiting] = {}
        self.unmatched: Counter[str] = Counter()  # unmatched_labels: expired labels, counted and deleted
        self.labelled: dict[Join, LabelledRecord] = {}  # by prediction id, model and version, as its key
        self.scored: dict[Join, int] = {}  # labelled rows in a performance window: its number
        self.windows: list[tuple[int, list[Join]]] = []  # the performance windows scored, with their rows
        self.performance: dict[Version, PerformanceState] = {}
        self.joins_fail = False  # storing a joined label fails for good (a value Postgres refuses)
        self.refused: set[str] = set()  # the same, for these predictions' labels only
        self.waits_refused: set[str] = set()  # storing these predictions' waiting labels fails for good
        self.replay_saves = 0
        self.ticks = 0

    def now(self) -> datetime:
        """Postgres's now(), a transaction's start: later for every transaction begun later."""
        self.ticks += 1
        return datetime.now(UTC) + timedelta(seconds=self.ticks)

    def begin(self) -> Tx:
        return Tx(self)

    def waiting(self) -> set[Pair]:
        return set(self.pending)


class Tx(NoPolicies):
    """One transaction's store: it sees what was committed before and its own writes, and writes on commit."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.began = tables.now()  # now() in Postgres: the transaction's start
        self.added: dict[Pair, PendingLabel] = {}
        self.taken: set[Pair] = set()
        self.expired: set[Pair] = set()
        self.labelled: dict[Join, LabelledRecord] = {}
        self.windows: list[tuple[int, list[Join]]] = []
        self.performance: dict[Version, PerformanceState] = {}
        self.on_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.on_commit.append(callback)

    def _waiting(self) -> dict[Pair, PendingLabel]:
        rows = {pair: row.label for pair, row in self.tables.pending.items()}
        rows.update(self.added)
        return {pair: label for pair, label in rows.items() if pair not in self.taken | self.expired}

    async def add_pending(self, labels: list[PendingLabel]) -> None:
        if any(label.prediction_id in self.tables.waits_refused for label in labels):
            raise ValueError("a value the pending_labels table cannot take")
        for label in labels:  # the latest for the pair is kept
            self.added[(label.prediction_id, label.model)] = replace(label, received_at=self.began)

    async def take_pending(self, ids: list[str], models: list[str]) -> list[PendingLabel]:
        waiting = self._waiting()
        taken = [waiting[pair] for pair in zip(ids, models, strict=True) if pair in waiting]
        self.taken.update((label.prediction_id, label.model) for label in taken)
        return taken

    async def expire_pending(self, received_before: datetime) -> list[Pair]:
        old = [
            pair
            for pair, row in self.tables.pending.items()
            if pair in self._waiting() and row.received_at < received_before
        ]
        self.expired.update(old)
        return old

    async def give_up_oldest_pending(self, count: int) -> list[Pair]:
        waiting = self._waiting()
        by_age = sorted(
            (row.received_at, pair) for pair, row in self.tables.pending.items() if pair in waiting
        )
        oldest = [pair for _, pair in by_age[:count]]
        self.expired.update(oldest)
        return oldest

    async def add_labelled(self, rows: list[LabelledRecord]) -> list[Pair]:
        if (rows and self.tables.joins_fail) or any(r.prediction_id in self.tables.refused for r in rows):
            raise ValueError("a value the labelled table cannot take")
        corrected = []
        for row in rows:
            row = replace(row, received_at=row.received_at or self.began)
            key = (row.prediction_id, row.model, row.version)
            old = self.labelled.get(key) or self.tables.labelled.get(key)
            if old is None:
                self.labelled[key] = row
            elif old.label != row.label and old.received_at <= row.received_at:  # type: ignore[operator]
                self.labelled[key] = replace(
                    old,
                    label=row.label,
                    observed_at=row.observed_at,
                    received_at=row.received_at,
                    outside_classes=row.outside_classes,
                )
                corrected.append((row.prediction_id, row.model))
        return list(dict.fromkeys(corrected))

    async def joined_labels(self, ids: list[str], models: list[str]) -> list[JoinedLabel]:
        rows = {**self.tables.labelled, **self.labelled}
        out = []
        for pair in dict.fromkeys(zip(ids, models, strict=True)):
            mine = [row for (pid, model, _), row in rows.items() if (pid, model) == pair]
            if mine:
                latest = max(mine, key=lambda r: r.received_at)  # type: ignore[arg-type, return-value]
                versions, variants = {r.version for r in mine}, {r.variant for r in mine}
                assert latest.received_at is not None  # set as stored
                received = latest.received_at
                out.append(JoinedLabel(*pair, latest.label, latest.observed_at, received, versions, variants))
        return out

    async def labels_joined_since(self, since: datetime) -> list[tuple[str, str, datetime, bool]]:
        latest: dict[Pair, tuple[datetime, bool]] = {}
        for (pid, model, _), row in self.tables.labelled.items():
            assert row.received_at is not None
            if row.received_at >= since:
                at, shadowed = latest.get((pid, model), (row.received_at, False))
                latest[(pid, model)] = (max(at, row.received_at), shadowed or row.variant == "shadow")
        return sorted(((*pair, *joined) for pair, joined in latest.items()), key=lambda r: r[2])

    async def unscored(self, model: str, version: int, limit: int) -> list[LabelledRecord]:
        scored = set(self.tables.scored).union(*(ids for _, ids in self.windows))
        rows = [
            row
            for row in {**self.tables.labelled, **self.labelled}.values()
            if (row.model, row.version) == (model, version)
            and (row.prediction_id, row.model, row.version) not in scored
        ]
        return sorted(rows, key=lambda r: (r.received_at, r.prediction_id))[:limit]

    async def mark_scored(self, model: str, version: int, prediction_ids: list[str], seq: int) -> None:
        self.windows.append((seq, [(pid, model, version) for pid in prediction_ids]))

    async def performance_state(self, model: str, version: int) -> PerformanceState:
        """The version's state (Postgres locks its row until the transaction ends; not modelled here)."""
        key = (model, version)
        return copy.deepcopy(
            self.performance.get(key) or self.tables.performance.get(key) or PerformanceState()
        )

    async def save_performance_state(self, model: str, version: int, state: PerformanceState) -> None:
        self.performance[(model, version)] = copy.deepcopy(state)

    async def watched_steps(self) -> list[Any]:
        return []

    async def save_replay_offsets(self, *_: Any) -> None:
        self.tables.replay_saves += 1

    async def pending_labels(self) -> set[Pair]:
        return set(self._waiting())

    async def replay_offsets(self, topic: str) -> dict[int, int]:
        return {0: 0}

    def wrote(self) -> bool:
        """Whether the transaction has anything to commit."""
        changes = (self.added, self.taken, self.expired, self.labelled, self.windows, self.performance)
        return any(changes) or bool(self.on_commit)

    def commit(self) -> None:
        t = self.tables
        for pair, label in self.added.items():
            t.pending[pair] = Waiting(label, self.began)
        for pair in self.taken:
            t.pending.pop(pair, None)
        for pair in self.expired:
            t.pending.pop(pair, None)
            t.unmatched[pair[1]] += 1
        t.labelled.update(self.labelled)
        for seq, ids in self.windows:
            t.scored.update(dict.fromkeys(ids, seq))
        t.windows.extend(self.windows)
        t.performance.update(self.performance)
        callbacks, self.on_commit = self.on_commit, []
        for callback in callbacks:
            callback()


class Runtime:
    """``begin()`` on the tables; ``commit_fails``: the commit of a transaction that wrote raises (Postgres
    away), nothing written. The tick's read of Postgres' clock, which writes nothing, goes through: the tick
    reaches the transaction each test fails."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.commit_fails = False
        self.settings = MonitoringSettings()
        self.registry = None

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        tx = self.tables.begin()

        async def publish(event: CloudEvent[Any]) -> None:
            pass

        yield type(
            "Tx", (), {"conn": tx, "publish": staticmethod(publish), "after_commit": tx.after_commit}
        )()
        if self.commit_fails and tx.wrote():
            raise ConnectionError("connection was closed in the middle of operation")
        tx.commit()


class TablesBus(InMemoryBus):
    """The in-memory bus with its transactions on the tables: a handler's writes are kept only if its
    transaction commits."""

    def __init__(self, tables: Tables) -> None:
        super().__init__(EventTypeRegistry([GroundTruthReceived, PredictionsLogged]))
        self.tables = tables

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[MemoryTransaction]:
        tx = self.tables.begin()
        async with super()._begin() as memory:
            memory.conn = tx
            yield memory
        tx.commit()


async def nothing(event: CloudEvent[Any]) -> None:
    pass


def tally_of(tx: Tx) -> Tally:
    """A tally whose counts are made when ``tx`` commits, as the service's transactions make them."""
    tally = Tally()
    tx.after_commit(tally.count)
    return tally


def delivery(event: CloudEvent[Any], offset: int) -> Delivery:
    return Delivery(Record(event.data.topic, 0, offset, None, b"", ()), event)


async def receive_label(
    monitor: Monitor, tx: Tx, prediction_id: str, model: str = "churn", label: Any = 1
) -> None:
    """The feedback consumer handles a label in ``tx``, not committed yet."""
    g = GroundTruthReceived(
        prediction_id=prediction_id, model=model, label=label, observed_at=datetime.now(UTC)
    )
    await on_ground_truth_received(
        [delivery(new_event(g, source="/feedback"), 0)],
        monitor=monitor,
        store=cast(MonitoringStore, tx),
        publish=nothing,
        tally=tally_of(tx),
    )


async def consume_prediction(
    monitor: Monitor, tables: Tables, request_id: str, offset: int = 0, model: str = "churn"
) -> None:
    """The predictions consumer handles a request (at ``offset`` of the topic) and commits."""
    tx = tables.begin()
    await on_predictions_logged(
        [delivery(logged(request_id, model=model), offset)],
        monitor=monitor,
        store=cast(MonitoringStore, tx),
        publish=nothing,
    )
    tx.commit()


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Monitor:
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monkeypatch.setattr("time.time", lambda: NOW)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    return monitor


async def test_a_prediction_consumed_while_its_labels_transaction_is_open_is_joined_at_the_next_tick(
    monitor: Monitor,
) -> None:
    tables = Tables()
    label_tx = tables.begin()
    await receive_label(monitor, label_tx, "good-1-0")
    await consume_prediction(monitor, tables, "good-1")  # the label's transaction has not committed yet
    label_tx.commit()
    assert tables.labelled == {} and tables.waiting() == {("good-1-0", "churn")}  # the join was missed

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set(tables.labelled) == {("good-1-0", "churn", 1)} and tables.waiting() == set()
    assert monitor.live.pending_labels == set()


async def test_a_prediction_consumed_while_its_label_is_being_stored_is_joined_at_the_next_tick(
    monitor: Monitor,
) -> None:
    tables = Tables()

    class Storing(Tx):
        """The label's transaction; while it stores the label, the predictions consumer runs."""

        def __init__(self, tables: Tables, meanwhile: Callable[[], Awaitable[None]]) -> None:
            super().__init__(tables)
            self.meanwhile = meanwhile

        async def add_pending(self, labels: list[PendingLabel]) -> None:
            await self.meanwhile()
            await super().add_pending(labels)

    label_tx = Storing(tables, lambda: consume_prediction(monitor, tables, "good-1"))
    await receive_label(monitor, label_tx, "good-1-0")
    label_tx.commit()
    assert tables.labelled == {} and tables.waiting() == {("good-1-0", "churn")}  # the join was missed

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set(tables.labelled) == {("good-1-0", "churn", 1)} and tables.waiting() == set()
    assert monitor.live.pending_labels == set()


async def test_a_missed_join_that_fails_for_good_is_given_up_and_the_housekeeping_goes_on(
    monitor: Monitor,
) -> None:
    tables = Tables()
    label_tx = tables.begin()
    await receive_label(monitor, label_tx, "good-1-0")
    await consume_prediction(monitor, tables, "good-1")
    label_tx.commit()
    tables.joins_fail = True

    with capture_logs() as logs:
        await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    [given_up] = [e for e in logs if e["event"].startswith("label join given up")]
    assert "expires as unmatched" in given_up["event"] and given_up["label"] == "waiting"
    assert tables.replay_saves == 1  # the housekeeping ran
    assert tables.labelled == {} and tables.waiting() == {
        ("good-1-0", "churn")
    }  # waits on, to expire as unmatched
    assert monitor.live.pending_labels == {("good-1-0", "churn")} and monitor.live.joins_due == set()


async def test_a_label_expired_by_a_tick_whose_transaction_fails_still_waits_in_memory_as_in_postgres(
    monitor: Monitor,
) -> None:
    tables = Tables()
    long_ago = datetime.fromtimestamp(NOW, UTC) - timedelta(days=2)
    tables.pending[("p-old", "churn")] = Waiting(PendingLabel("p-old", "churn", 1, long_ago), long_ago)
    monitor.live.pending_labels = {("p-old", "churn")}
    rt = Runtime(tables)
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]

    rt.commit_fails = True
    with pytest.raises(ConnectionError):
        await background.once()
    assert tables.waiting() == monitor.live.pending_labels == {("p-old", "churn")}

    rt.commit_fails = False
    await background.once()
    assert tables.waiting() == set() and monitor.live.pending_labels == set()
    assert tables.unmatched == {"churn": 1}


async def test_a_label_waiting_for_another_models_prediction_is_not_looked_for_again(
    monitor: Monitor,
) -> None:
    monitor.live.add_reference(replace(reference(), model="fraud"))  # registered: its labels may wait
    tables = Tables()
    await consume_prediction(monitor, tables, "good-1")  # churn's prediction good-1-0 is held
    label_tx = tables.begin()
    await receive_label(monitor, label_tx, "good-1-0", model="fraud")
    label_tx.commit()

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert tables.labelled == {} and tables.waiting() == {("good-1-0", "fraud")}
    assert monitor.live.pending_labels == {("good-1-0", "fraud")} and monitor.live.joins_due == set()


def joins_given_up(model: str) -> float:
    labels = {"model": model}
    return REGISTRY.get_sample_value("driftloop_monitoring_label_joins_given_up_total", labels) or 0.0


def corrections(model: str) -> float:
    labels = {"model": model}
    return REGISTRY.get_sample_value("driftloop_monitoring_labels_corrected_total", labels) or 0.0


def labels(tables: Tables) -> dict[str, Any]:
    """The joined labels of churn's predictions, by prediction id."""
    return {
        row.prediction_id: row.label for (_, model, _), row in tables.labelled.items() if model == "churn"
    }


async def send_label(monitor: Monitor, tables: Tables, prediction_id: str, model: str, label: Any) -> None:
    """The feedback consumer handles a label and commits."""
    tx = tables.begin()
    await receive_label(monitor, tx, prediction_id, model, label)
    tx.commit()


async def test_a_label_naming_another_model_does_not_keep_this_models_label_from_waiting(
    monitor: Monitor,
) -> None:
    monitor.live.add_reference(replace(reference(), model="fraud"))  # registered: its labels may wait
    tables = Tables()
    await send_label(monitor, tables, "good-1-0", "fraud", 0)  # the wrong model, sent first
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # the right one, while the first waits
    await consume_prediction(monitor, tables, "good-1")  # churn's prediction good-1-0

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert labels(tables) == {"good-1-0": 1}
    # The label naming another model waits on, for a prediction of its own, and expires as unmatched.
    assert [(row.label.model, row.label.label) for row in tables.pending.values()] == [("fraud", 0)]


async def test_a_corrected_label_replaces_the_one_still_waiting(monitor: Monitor) -> None:
    tables = Tables()
    await send_label(monitor, tables, "good-1-0", "churn", 0)
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # a correction, while the first waits
    await consume_prediction(monitor, tables, "good-1")

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert labels(tables) == {"good-1-0": 1}
    assert tables.waiting() == set()


async def test_a_label_for_a_prediction_joined_before_replaces_its_label_as_a_correction(
    monitor: Monitor,
) -> None:
    tables = Tables()
    before = corrections("churn")
    await consume_prediction(monitor, tables, "good-1")
    await send_label(monitor, tables, "good-1-0", "churn", 0)  # joined at once
    await send_label(monitor, tables, "good-1-0", "churn", 0)  # sent again: nothing changes
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # a correction, after the join

    assert labels(tables) == {"good-1-0": 1}
    assert tables.waiting() == set()
    assert corrections("churn") == before + 1


async def test_a_waiting_label_joined_after_a_later_one_was_joined_at_once_does_not_undo_it(
    monitor: Monitor,
) -> None:
    tables = Tables()
    await send_label(monitor, tables, "good-1-0", "churn", 0)  # waits
    await consume_prediction(monitor, tables, "good-1")  # its join is due with the background
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # the prediction is held: joined at once

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert labels(tables) == {"good-1-0": 1}
    assert tables.waiting() == set() and monitor.live.pending_labels == set()


async def test_a_prediction_event_whose_label_join_fails_for_good_counts_its_rows_once(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    """A prediction's rows go into the windows as it is consumed. Were its event dead-lettered after that
    (its label join failing for good), an operator replaying the dead letter would count its rows twice."""
    settings = MonitoringSettings(consumer_retry_backoff_s=0.001)
    tables = Tables()
    await send_label(monitor, tables, "good-1-0", "churn", 1)
    tables.joins_fail = True  # storing the joined label fails, whatever the transaction
    before = joins_given_up("churn")
    # The bus's transactions are never committed here: what a failed one wrote is rolled back.
    monkeypatch.setattr(
        bootstrap, "PgMonitoringStore", lambda conn: conn if conn is not None else tables.begin()
    )
    bus = predictions_bus(settings, monitor)

    await bus.publish(logged("good-1"))
    await bus.drain()
    for dead in bus.dead_letters:  # what an operator does with a dead letter: replay it to its topic
        r = dead.record
        bus.append_raw(r.topic, r.key, r.value, [(name, value or b"") for name, value in r.headers])
    await bus.drain()
    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert monitor.live.windows[("churn", 1)].rows == 3
    assert bus.dead_letters == []  # the join's failure is the label's, not the prediction event's
    assert tables.labelled == {} and tables.waiting() == {
        ("good-1-0", "churn")
    }  # given up: expires as unmatched
    assert joins_given_up("churn") == before + 1


async def test_a_join_whose_transaction_meets_an_outage_stays_due_and_is_made_at_the_next_tick(
    monitor: Monitor,
) -> None:
    tables = Tables()
    await send_label(monitor, tables, "good-1-0", "churn", 1)
    await consume_prediction(monitor, tables, "good-1")
    rt = Runtime(tables)
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]

    rt.commit_fails = True
    with pytest.raises(ConnectionError):
        await background.once()
    assert tables.labelled == {} and tables.waiting() == {("good-1-0", "churn")}
    assert monitor.live.pending_labels == monitor.live.joins_due == {("good-1-0", "churn")}

    rt.commit_fails = False
    await background.once()
    assert set(tables.labelled) == {("good-1-0", "churn", 1)} and tables.waiting() == set()
    assert monitor.live.pending_labels == set()


async def test_a_join_that_fails_for_good_is_given_up_alone_and_the_others_are_made(monitor: Monitor) -> None:
    tables = Tables()
    for pid in ("good-1-0", "good-1-1", "good-1-2"):
        await send_label(monitor, tables, pid, "churn", 1)
    await consume_prediction(monitor, tables, "good-1")
    tables.refused = {"good-1-1"}
    before = joins_given_up("churn")

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set(tables.labelled) == {("good-1-0", "churn", 1), ("good-1-2", "churn", 1)}
    assert (
        tables.waiting() == monitor.live.pending_labels == {("good-1-1", "churn")}
    )  # to expire as unmatched
    assert monitor.live.joins_due == set() and joins_given_up("churn") == before + 1


async def test_a_join_due_when_the_process_stopped_is_made_after_the_restart(
    monkeypatch: pytest.MonkeyPatch, monitor: Monitor
) -> None:
    """The predictions consumer committed its poll, the join it left due was in memory only: the restart's
    replay of the predictions topic finds it again."""
    tables = Tables()
    await send_label(monitor, tables, "good-1-0", "churn", 1)
    restarted = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    restarted.live.add_reference(reference())  # as restore loads it (its profile from the artifact store)

    async def replay(*_: Any, feed: Callable[[Any], Any], **__: Any) -> ReplayReport:
        feed([(logged("good-1").data, 0, 0)])
        return ReplayReport(records=1)

    monkeypatch.setattr(bootstrap, "replay_predictions", replay)
    rt = Runtime(tables)
    await bootstrap.restore(rt, restarted)  # type: ignore[arg-type]
    await Background(rt, restarted, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set(tables.labelled) == {("good-1-0", "churn", 1)} and tables.waiting() == set()
    assert restarted.live.pending_labels == set()


async def test_a_label_whose_transaction_fails_for_good_is_dead_lettered_and_does_not_wait_in_memory(
    monitor: Monitor,
) -> None:
    """The feedback handler marks a waiting label in memory before its transaction commits (a prediction
    consumed meanwhile must look for it). If that transaction fails for good, the label is dead-lettered and
    is not in Postgres: memory must not keep it waiting, nor a later prediction with its id look for it."""
    tables = Tables()
    tables.waits_refused = {"bad-1-0"}
    settings = MonitoringSettings(consumer_retry_backoff_s=0.001)
    [feedback] = [s for s in subscriptions(settings, monitor) if s.consumer.endswith("-feedback")]
    bus = TablesBus(tables)
    bus.subscribe(feedback)

    for pid in ("good-1-0", "bad-1-0"):  # one poll: the batch fails, then each label alone
        g = GroundTruthReceived(prediction_id=pid, model="churn", label=1, observed_at=datetime.now(UTC))
        await bus.publish(new_event(g, source="/feedback"))
    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "handler-failed" and "pending_labels" in dead.error
    assert tables.waiting() == monitor.live.pending_labels == {("good-1-0", "churn")}
    await consume_prediction(monitor, tables, "bad-1")  # a prediction with the dead-lettered label's id
    assert monitor.live.joins_to_make() == []


class Held(Tx):
    """A transaction whose ``method`` waits, when called, until ``release`` is set (``reached`` says it was
    called): the other transactions run meanwhile, in the order the test gives them."""

    def __init__(self, tables: Tables, method: str) -> None:
        super().__init__(tables)
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        held = getattr(self, method)

        async def wait_then_call(*args: Any) -> Any:
            self.reached.set()
            await self.release.wait()
            return await held(*args)

        setattr(self, method, wait_then_call)


async def stored_again_as_its_prediction_comes(
    monitor: Monitor, tables: Tables
) -> tuple[Held, asyncio.Task[None]]:
    """good-1-0's label 0 waits; its label 1 is being stored (``storing``, held in ``add_pending``) as its
    prediction is consumed, and that join is due with the background."""
    await send_label(monitor, tables, "good-1-0", "churn", 0)
    label_tx = Held(tables, "add_pending")
    storing = asyncio.create_task(receive_label(monitor, label_tx, "good-1-0", "churn", 1))
    await label_tx.reached.wait()  # the prediction was not held: the label is being stored to wait
    await consume_prediction(monitor, tables, "good-1")
    return label_tx, storing


async def test_a_label_sent_again_while_its_prediction_comes_is_the_one_joined_and_none_is_left_waiting(
    monitor: Monitor,
) -> None:
    """A prediction's label waits; a later one for it (a correction) is being stored, and the prediction comes
    meanwhile. In Postgres the background's join can take the earlier label before the later one's upsert
    (which then waits for the join to commit and inserts the later label anew): the join must not be made
    then, or the earlier label is joined and the later one waits in Postgres with memory no longer looking
    for it, to expire as unmatched."""
    tables = Tables()
    before = corrections("churn")
    label_tx, storing = await stored_again_as_its_prediction_comes(monitor, tables)
    background = Background(Runtime(tables), monitor, tick_s=1.0)  # type: ignore[arg-type]

    await background.once()  # a tick while the later label is being stored
    assert tables.labelled == {}  # the join waits for it: the earlier label is never joined
    label_tx.release.set()
    await storing
    label_tx.commit()
    await background.once()  # the next tick

    assert labels(tables) == {"good-1-0": 1}
    assert tables.waiting() == set() and monitor.live.pending_labels == set()
    assert corrections("churn") == before


async def test_a_join_left_for_a_label_being_stored_is_made_when_that_labels_transaction_fails(
    monitor: Monitor,
) -> None:
    """The join left for the next tick while a later label was being stored is made with the earlier label
    when the later one's transaction fails: the wait for it ends with its handler, whatever the outcome."""
    tables = Tables()
    label_tx, storing = await stored_again_as_its_prediction_comes(monitor, tables)
    tables.waits_refused = {"good-1-0"}  # storing the later label fails for good
    background = Background(Runtime(tables), monitor, tick_s=1.0)  # type: ignore[arg-type]

    await background.once()
    label_tx.release.set()
    with pytest.raises(ValueError):
        await storing
    await background.once()

    assert labels(tables) == {"good-1-0": 0}
    assert tables.waiting() == set() and monitor.live.pending_labels == set()


async def test_a_label_sent_again_while_the_earlier_one_expires_waits_in_memory_as_in_postgres(
    monitor: Monitor,
) -> None:
    """A label waited its time and the tick expires it while a later one for the same prediction is being
    stored. In Postgres the later label's upsert waits for the expiry to commit, then waits its own time:
    memory must go on looking for it, so that the prediction, when it comes, is joined."""
    tables = Tables()
    long_ago = datetime.fromtimestamp(NOW, UTC) - timedelta(days=2)
    tables.pending[("good-1-0", "churn")] = Waiting(PendingLabel("good-1-0", "churn", 0, long_ago), long_ago)
    monitor.live.pending_labels = {("good-1-0", "churn")}
    label_tx = Held(tables, "add_pending")
    storing = asyncio.create_task(receive_label(monitor, label_tx, "good-1-0", "churn", 1))
    await label_tx.reached.wait()
    background = Background(Runtime(tables), monitor, tick_s=1.0)  # type: ignore[arg-type]

    await background.once()  # expires the earlier label
    label_tx.release.set()
    await storing
    label_tx.commit()
    assert tables.waiting() == monitor.live.pending_labels == {("good-1-0", "churn")}

    await consume_prediction(monitor, tables, "good-1")
    await background.once()
    assert labels(tables) == {"good-1-0": 1}
    assert tables.waiting() == set() and monitor.live.pending_labels == set()


async def test_labels_joined_beside_each_other_fill_a_performance_window_with_each_row_once(
    monitor: Monitor,
) -> None:
    """The feedback consumer and the background join labels of one version in transactions side by side.
    Each reads the unscored rows, sees a full window (a row committed before, and its own), and takes the
    version's performance state; the later one waits in Postgres for the first to commit. It must not then
    score the rows the first one scored into a window of its own."""
    monitor.performance_window_labels = 2
    tables = Tables()
    await consume_prediction(monitor, tables, "good-1")
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # joined at once: one unscored row
    await send_label(monitor, tables, "good-2-0", "churn", 1)  # waits for its prediction
    await consume_prediction(monitor, tables, "good-2", offset=1)  # its join is due with the background
    label_tx = Held(tables, "performance_state")
    joining = asyncio.create_task(receive_label(monitor, label_tx, "good-1-1", "churn", 1))
    await label_tx.reached.wait()  # it read good-1-0 and good-1-1: a full window

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]
    label_tx.release.set()
    await joining
    label_tx.commit()

    assert tables.windows == [(1, [("good-1-0", "churn", 1), ("good-2-0", "churn", 1)])]
    assert Counter(tables.scored.values()) == {1: 2} and ("good-1-1", "churn", 1) not in tables.scored
    assert tables.performance[("churn", 1)].next_seq == 2


async def test_two_models_predictions_with_the_same_id_each_join_their_own_label(monitor: Monitor) -> None:
    # Prediction ids are the clients' to choose. Held by id alone, fraud's prediction took the place of
    # churn's, and churn's label waited (to expire as unmatched) beside a prediction of its own.
    monitor.live.add_reference(replace(reference(), model="fraud"))
    tables = Tables()
    await consume_prediction(monitor, tables, "good-1", offset=0, model="churn")
    await consume_prediction(monitor, tables, "good-1", offset=1, model="fraud")  # the same ids
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # joined at once, with churn's prediction
    await send_label(monitor, tables, "good-1-1", "fraud", 0)
    await send_label(monitor, tables, "good-2-0", "fraud", 1)  # waits for its prediction
    await send_label(monitor, tables, "good-2-0", "churn", 0)
    await consume_prediction(monitor, tables, "good-2", offset=2, model="fraud")
    await consume_prediction(monitor, tables, "good-2", offset=3, model="churn")

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert {key: row.label for key, row in tables.labelled.items()} == {
        ("good-1-0", "churn", 1): 1,
        ("good-1-1", "fraud", 1): 0,
        ("good-2-0", "fraud", 1): 1,
        ("good-2-0", "churn", 1): 0,
    }
    assert all(row.model == model for (_, model, _), row in tables.labelled.items())
    assert tables.waiting() == set() and monitor.live.pending_labels == set()
