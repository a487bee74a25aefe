"""Monitoring's live state against a naive model of what docs/monitoring.md promises (hypothesis.stateful).

Random interleavings of prediction polls (three registered model versions and an unknown one, two
partitions, stable, canary and shadow rows of two rollouts, dated on time, behind, beyond the label wait and
far ahead, prediction ids reused across models and versions), polls redelivered, labels before and after
their prediction (sent again, corrected, for a model never registered), the label joins and the housekeeping
of the background, windows judged, rollout steps watched, kept and dropped, time passing, and restarts that
replay the topic from the offsets the last tick saved, in any interleaving of its partitions. After every
step the state is what the model says:

- each window holds the rows routed to it, closed by count, event time or idleness as "Windows" says; a
  row redelivered is counted once; a restart's replay counts a row of a judged window in no window again;
- the label cache holds what "Labels and performance" says, by age, row bound and ``max_clock_skew_seconds``;
- a rollout step counts the rows of its rollout's canary (or shadow) and of its stable variant, dated from
  its start, and no other;
- every label whose prediction is held is joined to it, with that model's prediction only; one that waits
  is joined when its prediction comes; a label joined reaches a later shadow's scoring of its row;
- ``hold_offsets`` is at or before every row still in memory, and a restart replaying from there loses
  none of it.

Each row carries its serial number as its one feature and its prediction, so every window, cached
prediction, step sample and joined label names the rows it holds. Deterministic: the same runs every time
(200 runs of 50 steps, some 7 s).

It found two defects, each with an example test of its own since: a replay that closed a window it rebuilt
counted the judged rows of a partition it read later again (test_canary_watch.py), and a rollout step held
the replay back only to the first row it counted on a partition, after an earlier one of its other version
(test_canary_evidence.py).
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from contracts.envelope import CloudEvent, new_event
from contracts.feedback import GroundTruthReceived
from contracts.predictions import TOPIC, PredictionColumns, Variant
from libs.bus import Delivery, Record
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background
from services.monitoring.domain import CanaryStep, epoch, from_epoch
from services.monitoring.handlers import (
    Monitor,
    Tally,
    on_ground_truth_received,
    on_predictions_logged,
    set_window_aside,
)
from services.monitoring.live import LiveState, PredictionCache, WindowSettings
from services.monitoring.ports import MonitoringStore, WindowState
from tests.unit.monitoring.test_domain import T0, regression_reference
from tests.unit.monitoring.test_pending_labels import Runtime, Tables, Tx, delivery

MACHINE = settings(derandomize=True, deadline=None, database=None, max_examples=200, stateful_step_count=50)

WINDOW_ROWS, WINDOW_SECONDS, MIN_ROWS = 5, 60.0, 2
LABEL_WAIT, MAX_ROWS, MAX_AHEAD = 300.0, 14, 30.0
START = T0.timestamp()

Key = tuple[str, int]
Pair = tuple[str, str]  # (prediction id, model), as labels name predictions
REGISTERED: tuple[Key, ...] = (("churn", 1), ("churn", 2), ("fraud", 1))
UNREGISTERED: Key = ("churn", 3)
MODELS = ("churn", "fraud")
IDS = ("a", "b", "c", "d")
REFERENCES = {key: replace(regression_reference(), model=key[0], version=key[1]) for key in REGISTERED}

T = TypeVar("T")
EVENT_TYPE = "io.driftloop.PredictionsLogged.v1"


@dataclass(frozen=True)
class Request:
    """One PredictionsLogged as the machine sent it, at ``offset`` of ``partition``."""

    model: str
    version: int
    variant: str
    rollout_id: str | None
    predicted_at: float
    serials: tuple[int, ...]
    ids: tuple[str, ...]
    partition: int
    offset: int

    @property
    def key(self) -> Key:
        return (self.model, self.version)

    def columns(self) -> PredictionColumns:
        values: list[Any] = [float(s) for s in self.serials]
        return PredictionColumns(
            model=self.model,
            model_version=self.version,
            variant=Variant(self.variant),
            rollout_id=self.rollout_id,
            request_id=f"r{self.serials[0]}",
            predicted_at=from_epoch(self.predicted_at),
            latency_ms=1.0,
            prediction_ids=list(self.ids),
            entity_keys=[None] * len(values),
            inputs={"x0": values},
            predictions=list(values),
            probabilities=[None] * len(values),
        )


# --- the model: plain lists and dicts, as the docs put it ---------------------------------------------------


@dataclass
class ModelWindow:
    """A version's open window: its number and its rows."""

    seq: int
    serials: list[int] = field(default_factory=list)
    first_at: float | None = None
    last_arrival: float = 0.0


@dataclass
class ModelPart:
    """Predictions held together for their labels (they leave in the order they came)."""

    key: Key
    requests: list[Request]
    newest_at: float


@dataclass
class ModelStep:
    """A rollout step watched (or kept for its start), and the rows it counted."""

    rollout_id: str
    step_index: int
    model: str
    stable_version: int | None
    canary_version: int
    started_at: float
    canary: list[int] = field(default_factory=list)
    stable: list[int] = field(default_factory=list)

    def live(self) -> CanaryStep:
        return CanaryStep(
            self.rollout_id,
            self.model,
            self.stable_version,
            self.canary_version,
            self.step_index,
            self.started_at,
            min_samples=10,
            bake_seconds=60.0,
        )

    def fresh(self) -> ModelStep:
        return replace(self, canary=[], stable=[])


@dataclass
class Joined:
    """A joined label's row in ``labelled``: the prediction it joined, its label, when that was received."""

    serial: int
    label: float
    received_at: float


class Model:
    """What the docs say monitoring holds: the windows, the label cache, the rollout steps' rows, and in
    Postgres the windows done, the waiting labels and the joined ones."""

    def __init__(self) -> None:
        self.rows: dict[int, Request] = {}  # every row sent, by serial
        # Postgres: it survives a restart
        self.done: dict[Key, set[int]] = {key: set() for key in REGISTERED}
        self.next_seq: dict[Key, int] = dict.fromkeys(REGISTERED, 1)
        self.pending: dict[Pair, tuple[float, float]] = {}  # label, received at
        self.labelled: dict[tuple[str, str, int], Joined] = {}
        # memory
        self.steps: dict[str, ModelStep] = {}
        self.kept: dict[str, ModelStep] = {}
        self.joined_until: dict[Pair, float] = {}
        self.start()

    def start(self) -> None:
        """Memory as a (re)started process has it before the replay."""
        self.windows = {key: ModelWindow(self.next_seq[key]) for key in REGISTERED}
        self.closed: deque[tuple[Key, int, list[int], bool]] = deque()
        self.parts: deque[ModelPart] = deque()
        self.next_offsets: dict[int, int] = {}
        self.steps = {r: s.fresh() for r, s in self.steps.items()}
        self.kept = {r: s.fresh() for r, s in self.kept.items()}

    # -- predictions

    def ingest(self, polled: list[Request], arrival: float, *, replaying: bool = False) -> None:
        groups: dict[Key, list[Request]] = {}
        for r in polled:
            if r.offset < self.next_offsets.get(r.partition, -1):
                continue  # redelivered: counted already
            self.next_offsets[r.partition] = r.offset + 1
            groups.setdefault(r.key, []).append(r)
        latest = arrival + MAX_AHEAD
        for key, reqs in groups.items():
            if key not in REGISTERED:
                continue
            # A replay reads rows of windows done before the restart, and the others: runs of each.
            runs: list[list[Request]] = []
            for r in reqs:
                if runs and (not replaying or self._is_done(r) == self._is_done(runs[-1][0])):
                    runs[-1].append(r)
                else:
                    runs.append([r])
            for run in runs:
                self._route(key, run, arrival, replaying)
            for step in [*self.steps.values(), *self.kept.values()]:
                for r in reqs:
                    at = min(r.predicted_at, latest)
                    if step.model != r.model or at < step.started_at:
                        continue
                    if r.version == step.canary_version:
                        if r.rollout_id == step.rollout_id and r.variant in ("canary", "shadow"):
                            step.canary += r.serials
                    elif r.version == step.stable_version and r.variant == "stable":
                        step.stable += r.serials

    def _is_done(self, r: Request) -> bool:
        return set(r.serials) <= self.done[r.key]

    def _route(self, key: Key, run: list[Request], arrival: float, replaying: bool) -> None:
        if replaying and self._is_done(run[0]):
            # rows of a window done before the restart: only the label cache wants them
            self._hold(key, run, arrival)
            return
        part: list[Request] = []
        for r in run:
            at = min(r.predicted_at, arrival + MAX_AHEAD)
            w = self.windows[key]
            if w.first_at is not None and len(w.serials) >= MIN_ROWS and at >= w.first_at + WINDOW_SECONDS:
                self._hold(key, part, arrival)
                part = []
                self._close(key)
                w = self.windows[key]
            w.serials += r.serials
            w.first_at = at if w.first_at is None else w.first_at
            w.last_arrival = arrival
            part.append(r)
            if len(w.serials) >= WINDOW_ROWS:
                self._hold(key, part, arrival)
                part = []
                self._close(key)
        self._hold(key, part, arrival)

    def _hold(self, key: Key, reqs: list[Request], arrival: float) -> None:
        if reqs:
            newest = min(max(r.predicted_at for r in reqs), arrival + MAX_AHEAD)
            self.parts.append(ModelPart(key, list(reqs), newest))

    def _close(self, key: Key, *, too_few: bool = False) -> None:
        w = self.windows[key]
        if w.serials:
            self.closed.append((key, w.seq, w.serials, too_few))
        self.windows[key] = ModelWindow(w.seq + 1)

    def close_idle(self, now: float) -> None:
        for key, w in list(self.windows.items()):
            idle = now - w.last_arrival
            if len(w.serials) >= MIN_ROWS and idle >= WINDOW_SECONDS:
                self._close(key)
            elif 0 < len(w.serials) < MIN_ROWS and idle >= LABEL_WAIT:
                self._close(key, too_few=True)

    def judge(self) -> None:
        key, seq, serials, _ = self.closed.popleft()
        self.done[key] |= set(serials)
        self.next_seq[key] = seq + 1

    def rows_held(self) -> int:
        return sum(len(r.serials) for part in self.parts for r in part.requests)

    def held(self) -> dict[tuple[str, int, str], int]:
        """Per model, version and prediction id, the row held for its label (the latest with the id)."""
        out: dict[tuple[str, int, str], int] = {}
        for part in self.parts:
            for r in part.requests:
                for serial, pid in zip(r.serials, r.ids, strict=True):
                    out[(r.model, r.version, pid)] = serial
        return out

    def evict(self, now: float, joins_due: set[Pair]) -> None:
        while self.parts and (self.parts[0].newest_at < now - LABEL_WAIT or self.rows_held() > MAX_ROWS):
            front = self.parts[0]
            due = any((pid, front.key[0]) in joins_due for r in front.requests for pid in r.ids)
            if self.rows_held() <= MAX_ROWS and due:
                break
            self.parts.popleft()

    # -- labels

    def held_by_pair(self) -> dict[Pair, dict[int, int]]:
        """The rows held, per pair and version."""
        out: dict[Pair, dict[int, int]] = {}
        for (model, version, pid), serial in self.held().items():
            out.setdefault((pid, model), {})[version] = serial
        return out

    def _write(self, pair: Pair, version: int, serial: int, label: float, received_at: float) -> None:
        key = (*pair, version)
        old = self.labelled.get(key)
        if old is None:
            self.labelled[key] = Joined(serial, label, received_at)
        elif old.label != label and old.received_at <= received_at:
            self.labelled[key] = Joined(old.serial, label, received_at)

    def shadowed(self, pair: Pair) -> bool:
        """Whether the pair's label joined a shadow candidate's scoring."""
        return any(
            self.rows[j.serial].variant == "shadow"
            for (p, m, _), j in self.labelled.items()
            if (p, m) == pair
        )

    def label(self, pair: Pair, label: float, now: float) -> None:
        if pair[1] not in {m for m, _ in REGISTERED}:
            return  # no prediction of a model never registered is held: not kept
        held = self.held_by_pair().get(pair)
        if not held:
            self.pending[pair] = (label, now)
            return
        for version, serial in held.items():
            self._write(pair, version, serial, label, now)
        self.joined_until[pair] = now + LABEL_WAIT

    def joins(self) -> dict[Pair, dict[int, int]]:
        """The joins a tick is to make: per pair, the held rows (per version) its label is to join."""
        out: dict[Pair, dict[int, int]] = {}
        for pair, held in self.held_by_pair().items():
            if pair in self.pending:
                out[pair] = held
            elif pair in self.joined_until:
                joined = {v for (p, m, v) in self.labelled if (p, m) == pair}
                new = {
                    v: s
                    for v, s in held.items()
                    if v not in joined and (self.shadowed(pair) or self.rows[s].variant == "shadow")
                }
                if new:
                    out[pair] = new
        return out

    def join(self) -> None:
        for pair, rows in self.joins().items():
            if pair in self.pending:
                label, received = self.pending.pop(pair)
            else:
                latest = max(
                    (j for (p, m, _), j in self.labelled.items() if (p, m) == pair),
                    key=lambda j: j.received_at,
                )
                label, received = latest.label, latest.received_at
            for version, serial in rows.items():
                self._write(pair, version, serial, label, received)
            self.joined_until[pair] = received + LABEL_WAIT

    def housekeeping(self, now: float, joins_due: set[Pair], *, expire: bool) -> None:
        self.close_idle(now)
        self.evict(now, joins_due)
        self.joined_until = {pair: t for pair, t in self.joined_until.items() if t >= now}
        if expire:
            self.pending = {pair: w for pair, w in self.pending.items() if w[1] >= now - LABEL_WAIT}

    def restart(self, now: float) -> None:
        self.start()
        latest: dict[Pair, float] = {}
        for (pid, m, _), j in self.labelled.items():
            if j.received_at >= now - LABEL_WAIT:
                latest[(pid, m)] = max(latest.get((pid, m), j.received_at), j.received_at)
        self.joined_until = {pair: at + LABEL_WAIT for pair, at in latest.items()}

    def in_memory(self) -> dict[str, list[int]]:
        """Every row memory still holds, by what holds it: a window open or closed but not done, the label
        cache, a rollout step."""
        holders = {f"window {key}": w.serials for key, w in self.windows.items()}
        holders.update({f"closed window {i}": serials for i, (_, _, serials, _) in enumerate(self.closed)})
        holders["label cache"] = [s for part in self.parts for r in part.requests for s in r.serials]
        holders.update({f"step {r}": s.canary + s.stable for r, s in self.steps.items()})
        holders.update({f"kept step {r}": s.canary + s.stable for r, s in self.kept.items()})
        return holders


# --- Postgres as the unit tests fake it, on the machine's clock ---------------------------------------------


class Postgres(Tables):
    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.clock = clock
        self.saved: dict[int, int] | None = None  # the replay offsets the last tick saved
        self.window_states: dict[Key, WindowState] = {}

    def now(self) -> Any:
        return from_epoch(self.clock())

    def begin(self) -> Transaction:
        return Transaction(self)


class Transaction(Tx):
    tables: Postgres
    saving: dict[int, int] | None = None

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        self.saving = dict(offsets)

    def commit(self) -> None:
        if self.saving is not None:
            self.tables.saved = self.saving
        super().commit()

    async def window_state(self, model: str, version: int, *, lock: bool = False) -> WindowState:
        return copy.deepcopy(self.tables.window_states.get((model, version), WindowState()))

    async def save_window_state(self, model: str, version: int, state: WindowState) -> None:
        self.tables.window_states[(model, version)] = copy.deepcopy(state)


class Database(Runtime):
    """The background's runtime on these tables (``commit_fails``: Postgres goes away before a commit)."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.commit_fails = False


def live_state() -> LiveState:
    return LiveState(
        WindowSettings(rows=WINDOW_ROWS, seconds=WINDOW_SECONDS, min_rows=MIN_ROWS),
        PredictionCache(max_age_s=LABEL_WAIT, max_rows=MAX_ROWS, max_ahead_s=MAX_AHEAD),
        step_max_rows=100_000,  # every row kept: the samples name every row counted
    )


def serials(values: Iterable[Any]) -> list[int]:
    return [int(v) for v in values]


outages = st.sampled_from([False, False, False, True])
requests = st.lists(
    st.tuples(
        st.sampled_from([*REGISTERED, UNREGISTERED]),
        st.sampled_from(["stable", "canary", "shadow"]),
        st.sampled_from([None, "r1", "r2"]),
        st.sampled_from(
            [0.0, 0.0, 2.0, -3.0, -40.0, 45.0, -LABEL_WAIT - 100, 10_000.0]
        ),  # predicted_at - now
        st.lists(st.sampled_from(IDS), min_size=1, max_size=3),
        st.integers(0, 1),
    ),
    min_size=1,
    max_size=4,
)


class LiveMachine(RuleBasedStateMachine):
    """Monitoring's handlers and background on a LiveState and the fake Postgres, beside the model."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = START
        self.log: dict[int, list[Request]] = {0: [], 1: []}
        self.polls: list[list[Request]] = []
        self.serial = 0
        self.label_values: dict[Pair, list[float]] = {}
        self.model = Model()
        self.db = Postgres(lambda: self.now)
        self.monitor = Monitor(
            live=live_state(),
            defaults=cast(Any, None),
            canary=cast(Any, None),
            artifacts=cast(Any, None),
            source="/test",
            performance_window_labels=10**6,  # no performance window to score
            label_wait_seconds=LABEL_WAIT,
            clock=lambda: self.now,
        )
        for key in REGISTERED:
            self.monitor.live.add_reference(REFERENCES[key])
        self.rt = Database(self.db)
        self.background = Background(self.rt, self.monitor, tick_s=1.0)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.loop.close()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    @property
    def live(self) -> LiveState:
        return self.monitor.live

    # -- rules ---------------------------------------------------------------------------------------------

    @rule(sent=requests)
    def predictions_consumed(self, sent: list[tuple[Key, str, str | None, float, list[str], int]]) -> None:
        """A poll of requests of any model version (one never registered too), variant and rollout."""
        poll = []
        for (model, version), variant, rollout_id, ahead, ids, partition in sent:
            first = self.serial
            self.serial += len(ids)
            r = Request(
                model,
                version,
                variant,
                rollout_id,
                self.now + ahead,
                tuple(range(first, self.serial)),
                tuple(ids),
                partition,
                len(self.log[partition]),
            )
            self.log[partition].append(r)
            self.model.rows.update(dict.fromkeys(r.serials, r))
            poll.append(r)
        self.polls.append(poll)
        self.consume(poll)

    @rule(
        rollout_id=st.sampled_from(["r1", "r2"]),
        sent=st.lists(
            st.tuples(
                st.sampled_from(
                    [(("churn", 1), "stable"), (("churn", 2), "canary"), (("churn", 2), "shadow")]
                ),
                st.sampled_from([0.0, 0.0, -40.0, 45.0]),
                st.lists(st.sampled_from(IDS), min_size=1, max_size=2),
                st.integers(0, 1),
            ),
            min_size=2,
            max_size=5,
        ),
    )
    def rollout_traffic_consumed(
        self, rollout_id: str, sent: list[tuple[tuple[Key, str], float, list[str], int]]
    ) -> None:
        """A rollout's traffic: its stable version's and its candidate's (canary, or shadow) requests."""
        self.predictions_consumed(
            [
                (key, variant, rollout_id, ahead, ids, partition)
                for (key, variant), ahead, ids, partition in sent
            ]
        )

    def consume(self, poll: list[Request]) -> None:
        deliveries = [
            Delivery(
                Record(TOPIC, r.partition, r.offset, None, None, ()),
                CloudEvent.model_construct(
                    data=r.columns(), source="/serving", type=EVENT_TYPE, correlationid=f"r{r.serials[0]}"
                ),
            )
            for r in poll
        ]
        self.run(
            on_predictions_logged(
                deliveries,
                monitor=self.monitor,
                store=cast(MonitoringStore, None),
                publish=cast(Any, None),
            )
        )
        self.model.ingest(poll, self.now)

    @precondition(lambda self: self.polls)
    @rule(data=st.data())
    def poll_redelivered(self, data: st.DataObject) -> None:
        """A poll read again after its transaction failed (an outage): recognised by offset, counted once."""
        poll = data.draw(st.sampled_from(self.polls))
        before = self.live.hold_offsets(), self.live.cache.rows
        result = self.live.ingest([(r.columns(), r.partition, r.offset) for r in poll], arrival=self.now)
        assert (result.rows, result.pending_matches) == (0, [])
        assert (self.live.hold_offsets(), self.live.cache.rows) == before

    @rule(pid=st.sampled_from(IDS), model=st.sampled_from([*MODELS, "ghost"]), again=st.booleans())
    def label_received(self, pid: str, model: str, again: bool) -> None:
        """A label (the pair's last one sent again, or a new one: a correction), committed."""
        pair = (pid, model)
        sent = self.label_values.setdefault(pair, [])
        if not (again and sent):
            sent.append(float(1_000_000 + len(sent) * 1_000 + IDS.index(pid)))
        label = sent[-1]
        g = GroundTruthReceived(prediction_id=pid, model=model, label=label, observed_at=from_epoch(self.now))
        tx = self.db.begin()
        tally = Tally()
        tx.after_commit(tally.count)
        self.run(
            on_ground_truth_received(
                [delivery(new_event(g, source="/feedback"), 0)],
                monitor=self.monitor,
                store=cast(MonitoringStore, tx),
                publish=cast(Any, None),
                tally=tally,
            )
        )
        tx.commit()
        self.model.label(pair, label, self.now)

    def in_tick(self, work: Coroutine[Any, Any, None], outage: bool) -> None:
        """Run a task of the background's tick; ``outage``: Postgres goes away before it commits."""
        self.rt.commit_fails = outage
        try:
            self.run(work)
        except ConnectionError:
            assert outage
        finally:
            self.rt.commit_fails = False

    @rule(outage=outages)
    def joins_made(self, outage: bool) -> None:
        self.in_tick(self.background.join_due(), outage)
        if not outage:
            self.model.join()

    @rule(outage=outages)
    def housekeeping(self, outage: bool) -> None:
        due = set(self.live.joins_due)
        self.in_tick(self.background.housekeeping(self.now), outage)
        # Memory lets go of what it holds as the tick runs; Postgres expires its labels once it commits.
        self.model.housekeeping(self.now, due, expire=not outage)
        assert self.live.cache.rows <= MAX_ROWS

    @precondition(lambda self: self.live.closed)
    @rule()
    def window_judged(self) -> None:
        """The first closed window is done (judged, or set aside: stored alike)."""
        window = self.live.closed[0]
        tx = self.db.begin()
        self.run(set_window_aside(window, monitor=self.monitor, store=cast(MonitoringStore, tx)))
        tx.commit()
        self.live.closed.popleft()
        self.model.judge()

    @rule(seconds=st.sampled_from([1.0, 30.0, 61.0, 299.0, 301.0, 5_000.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(
        rollout_id=st.sampled_from(["r1", "r2"]),
        step_index=st.integers(0, 2),
        stable_version=st.sampled_from([1, None]),
        since=st.sampled_from([-100.0, 0.0, 20.0, 100.0]),
        kept=st.booleans(),
    )
    def step_watched(
        self, rollout_id: str, step_index: int, stable_version: int | None, since: float, kept: bool
    ) -> None:
        step = ModelStep(rollout_id, step_index, "churn", stable_version, 2, self.now + since)
        if kept:
            self.live.keep(step.live())
            if rollout_id not in self.model.kept or self.model.kept[rollout_id].step_index < step_index:
                self.model.kept[rollout_id] = step
        else:
            self.live.watch(step.live())
            self.model.steps[rollout_id] = step

    @rule(rollout_id=st.sampled_from(["r1", "r2"]), step_index=st.sampled_from([None, 0, 1, 2]))
    def step_decided(self, rollout_id: str, step_index: int | None) -> None:
        self.live.unwatch(rollout_id, step_index)
        self.live.take_kept(rollout_id, step_index)
        for steps in (self.model.steps, self.model.kept):
            step = steps.get(rollout_id)
            if step is not None and step_index in (None, step.step_index):
                del steps[rollout_id]

    @rule(data=st.data())
    def restarted(self, data: st.DataObject) -> None:
        """The process stops and starts again: memory is rebuilt from Postgres and the replay of the topic
        from the offsets the last tick saved, up to what was consumed, its partitions in any interleaving."""
        # A partition first read after the last tick has no saved offset and is not replayed: not what this
        # machine is about (a crash within a tick of a partition's first record). Then the crash comes right
        # after a tick.
        if self.db.saved is None or not set(self.live.next_offsets) <= set(self.db.saved):
            self.housekeeping(outage=False)
        saved = self.db.saved
        assert saved is not None
        consumed = dict(self.live.next_offsets)
        before = self.snapshot()
        live = live_state()
        self.monitor.live = live
        for key in REGISTERED:
            state = self.db.window_states.get(key, WindowState())
            live.add_reference(REFERENCES[key], seq=state.next_seq, starts=state.starts)
        for step in self.model.steps.values():
            live.watch(step.live())
        for step in self.model.kept.values():
            live.keep(step.live())
        live.pending_labels = self.db.waiting()
        since = self.now - LABEL_WAIT
        joined = self.run(Transaction(self.db).labels_joined_since(from_epoch(since)))
        live.remember_joined(
            (((pid, m), epoch(at) + LABEL_WAIT, shadowed) for pid, m, at, shadowed in joined),
            bound=MAX_ROWS,
        )
        queues = {p: [r for r in self.log[p] if saved[p] <= r.offset < consumed[p]] for p in saved}
        self.model.restart(self.now)
        self.polls = []  # the consumer goes on from what was committed: none of those is delivered again
        while any(queues.values()):
            poll: list[Request] = []
            for _ in range(data.draw(st.integers(1, 4))):
                ready = [p for p, q in queues.items() if q]
                if not ready:
                    break
                poll.append(queues[data.draw(st.sampled_from(ready))].pop(0))
            result = live.ingest(
                [(r.columns(), r.partition, r.offset) for r in poll], arrival=self.now, replaying=True
            )
            live.joins_due.update(result.pending_matches)
            self.model.ingest(poll, self.now, replaying=True)
        after = self.snapshot()
        # Nothing memory held is lost, nothing done is counted again.
        for key in REGISTERED:
            assert before["windows"][key] <= after["windows"][key], f"rows of {key} lost by the restart"
            assert not after["windows"][key] & self.model.done[key], f"rows of {key} counted twice"
        assert set(before["held"]) <= set(after["held"]), (
            "predictions held for their labels lost by the restart"
        )
        for step, counted in before["steps"].items():
            assert counted <= after["steps"][step], f"rows of step {step} lost by the restart"

    def snapshot(self) -> dict[str, Any]:
        live = self.live
        windows = {key: set(self.window_rows(key)) for key in REGISTERED}
        for w in live.closed:
            windows[(w.model, w.version)] |= set(serials(w.numeric["x0"]))
        steps = {
            (kept, rollout): set(serials(s.canary.predictions())) | set(serials(s.stable.predictions()))
            for kept, held in ((False, live.steps), (True, live.kept))
            for rollout, s in held.items()
        }
        return {"windows": windows, "held": self.held(), "steps": steps}

    # -- what the code holds --------------------------------------------------------------------------------

    def window_rows(self, key: Key) -> list[int]:
        return [s for part in self.live.windows[key].parts for s in serials(part.numeric["x0"])]

    def held(self) -> dict[tuple[str, int, str], int]:
        return {
            (hit.model, hit.version, pid): int(hit.inputs["x0"])
            for model in MODELS
            for pid in IDS
            for hit in self.live.cache.predictions(model, pid)
        }

    # -- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def windows_hold_the_rows_routed_to_them(self) -> None:
        for key in REGISTERED:
            w, expected = self.live.windows[key], self.model.windows[key]
            assert (w.seq, self.window_rows(key)) == (expected.seq, expected.serials), key
            assert w.rows == len(expected.serials)
        closed = [
            ((w.model, w.version), w.seq, serials(w.numeric["x0"]), w.too_few_rows) for w in self.live.closed
        ]
        assert closed == list(self.model.closed)

    @invariant()
    def the_cache_holds_what_the_label_wait_and_bound_say(self) -> None:
        assert self.live.cache.rows == self.model.rows_held()
        assert self.held() == self.model.held()

    @invariant()
    def steps_count_their_rollouts_rows_only(self) -> None:
        for live_steps, steps in ((self.live.steps, self.model.steps), (self.live.kept, self.model.kept)):
            assert set(live_steps) == set(steps)
            for rollout_id, step in live_steps.items():
                expected = steps[rollout_id]
                assert step.step_index == expected.step_index
                assert serials(step.canary.predictions()) == expected.canary
                assert serials(step.stable.predictions()) == expected.stable
                assert (step.canary.rows, step.stable.rows) == (len(expected.canary), len(expected.stable))

    @invariant()
    def hold_offsets_keep_every_row_still_in_memory(self) -> None:
        live = self.live
        # Each holder's own first offsets (what hold_offsets takes the least of), and all of them together.
        firsts = {f"window {key}": w.first_offsets for key, w in live.windows.items()}
        firsts.update({f"closed window {i}": w.first_offsets for i, w in enumerate(live.closed)})
        firsts["label cache"] = live.cache.first_offsets()
        firsts.update({f"step {r}": s.first_offsets for r, s in live.steps.items()})
        firsts.update({f"kept step {r}": s.first_offsets for r, s in live.kept.items()})
        hold = live.hold_offsets()
        for holder, rows in self.model.in_memory().items():
            for serial in rows:
                r = self.model.rows[serial]
                for offsets in (firsts[holder], hold):
                    assert offsets.get(r.partition, r.offset + 1) <= r.offset, (holder, r, offsets)

    @invariant()
    def labels_join_their_own_models_predictions(self) -> None:
        stored = {key: (int(row.inputs["x0"]), row.label) for key, row in self.db.labelled.items()}
        for (pid, model, version), (serial, _) in stored.items():
            r = self.model.rows[serial]
            assert (r.model, r.version, r.ids[r.serials.index(serial)]) == (model, version, pid)
        assert stored == {key: (j.serial, j.label) for key, j in self.model.labelled.items()}
        # Memory follows what Postgres committed.
        assert self.db.waiting() == set(self.model.pending) == self.live.pending_labels

    @invariant()
    def every_join_to_make_is_due(self) -> None:
        missing = set(self.model.joins()) - self.live.joins_due
        assert not missing, f"joins never made: {missing}"


def test_live_state_holds_what_the_docs_promise_through_any_interleaving_and_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    run_state_machine_as_test(LiveMachine, settings=MACHINE)
