"""The in-memory side of monitoring: open windows, the predictions waiting for labels, and the traffic of
live rollout steps. Pure (no I/O): the handlers feed it batches and persist what it closes.

What lives only here is rebuilt after a restart by re-reading the predictions topic from the offsets this
state still depends on (:meth:`LiveState.hold_offsets`), which the service stores in Postgres.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import chain, pairwise, repeat
from typing import Any, Generic, TypeVar

import numpy as np

from contracts.predictions import PredictionColumns, PredictionsLogged, Variant
from services.monitoring.domain import (
    CanaryStep,
    ClosedWindow,
    DriftWindow,
    ModelReference,
    RowBatch,
    canary_evidence,
    rows_of,
    split_point,
)

ModelKey = tuple[str, int]
SHADOW = Variant.SHADOW.value
"""The variant of a shadow candidate's scoring of a served row (under the served prediction's id)."""
# payload, partition, offset; the payload as columns (monitoring's reader) or as full validation gave it
Request = tuple[PredictionColumns | PredictionsLogged, int, int]

WARNED_KEYS_KEPT = 1_000
"""How many models (or model versions) a warning given once per key, or once a while per key, remembers."""
UNKNOWN_VERSIONS_LISTED = 1_000
"""How many unknown (model, version) pairs ``/v1/status`` lists with their skipped rows; the rows of further
pairs are counted together (:attr:`LiveState.unknown_rows_not_listed`)."""

K = TypeVar("K", bound=Hashable)


class Warned(Generic[K]):
    """The keys a warning was given for, to give it once per key (or, with ``every_s``, at most once that
    often per key), remembering at most ``limit`` keys: the least lately seen is forgotten first, and warned
    about again if it comes back. The keys are model names and versions that events carry, and the bus does
    not authenticate a publisher: one remembered for good per key grew by a key per made-up name."""

    def __init__(self, limit: int = WARNED_KEYS_KEPT, *, every_s: float | None = None) -> None:
        self.limit = limit
        self.every_s = every_s
        self._at: OrderedDict[K, float] = OrderedDict()

    def due(self, key: K, now: float = 0.0) -> bool:
        """Whether to warn about ``key`` at ``now``; if so, the warning is taken as given then."""
        at = self._at.get(key)
        if at is not None:
            self._at.move_to_end(key)
            if self.every_s is None or now - at < self.every_s:
                return False
        self._at[key] = now
        while len(self._at) > self.limit:
            self._at.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, key: object) -> bool:
        return key in self._at


@dataclass
class CachedPrediction:
    """What a label is joined with."""

    model: str
    version: int
    variant: str
    rollout_id: str | None
    prediction_id: str
    predicted_at: float
    prediction: Any
    score: float | None
    inputs: dict[str, Any]
    window_seq: int


@dataclass
class _CachedPart:
    batch: RowBatch
    window_seq: int
    newest_at: float
    first_offsets: dict[int, int]


class PredictionCache:
    """Predictions kept for their labels, bounded by age and count; oldest parts leave first.

    Held per model, then version, then prediction id, as Postgres joins them (``labelled`` is keyed by the
    three): prediction ids are the clients' to choose, and two models may answer requests with the same id;
    and in a shadow rollout serving logs the candidate's scoring of a served row under the served
    prediction's id (docs/serving.md), so one model has two predictions of that id, one per version. A label
    joins every one of them. Held by model and id alone, the shadow prediction (logged later) took the
    stable one's place, and the stable version got no label for the rows its candidate shadowed. Within one
    version a later prediction with an id takes the earlier one's place."""

    def __init__(self, *, max_age_s: float, max_rows: int, max_ahead_s: float = 300.0) -> None:
        self.max_age_s = max_age_s
        self.max_rows = max_rows
        # A part is held by its newest row's date, but never one further ahead of its arrival than this: one
        # dated years ahead (a serving replica's clock) would stay until the row bound pushed it out, and keep
        # every part behind it (they leave in order) and the replay offsets with it.
        self.max_ahead_s = max_ahead_s
        self._index: dict[str, dict[int, dict[str, tuple[_CachedPart, int]]]] = {}
        self._parts: deque[_CachedPart] = deque()
        self.rows = 0

    def add(self, batch: RowBatch, window_seq: int, *, arrival: float) -> None:
        """Hold a batch's predictions, which came at ``arrival`` (monitoring's clock)."""
        if batch.size == 0:
            return
        first: dict[int, int] = {}
        for p, o in zip(batch.partition.tolist(), batch.offset.tolist(), strict=True):
            first.setdefault(p, o)
        newest = min(float(batch.predicted_at.max()), arrival + self.max_ahead_s)
        part = _CachedPart(batch, window_seq, newest, first)
        self._parts.append(part)
        # (part, row) per id, the pairs built in C: this runs for every prediction consumed. A batch holds
        # one model version's rows.
        index = self._index.setdefault(batch.model, {}).setdefault(batch.version, {})
        index.update(zip(batch.prediction_ids, zip(repeat(part), range(batch.size)), strict=True))
        self.rows += batch.size

    def predictions(self, model: str, prediction_id: str) -> list[CachedPrediction]:
        """The held predictions of ``model`` with this id, one per version (stable and shadow), by version."""
        versions = self._index.get(model, {})
        return [
            self._prediction(hit, prediction_id)
            for _, index in sorted(versions.items())
            if (hit := index.get(prediction_id)) is not None
        ]

    def _prediction(self, hit: tuple[_CachedPart, int], prediction_id: str) -> CachedPrediction:
        part, i = hit
        b = part.batch
        request = int(np.searchsorted(np.cumsum(b.request_rows), i, side="right"))
        inputs = {k: _plain(v[i]) for k, v in b.numeric.items()}
        inputs.update({k: v[i] for k, v in b.categorical.items()})
        score = float(b.score[i])
        return CachedPrediction(
            model=b.model,
            version=b.version,
            variant=b.variant[request],
            rollout_id=b.rollout_id[request],
            prediction_id=prediction_id,
            predicted_at=float(b.predicted_at[i]),
            prediction=b.prediction[i],
            score=None if np.isnan(score) else score,
            inputs=inputs,
            window_seq=part.window_seq,
        )

    def holds(self, model: str, prediction_id: str) -> bool:
        """Whether a prediction of ``model`` with this id is held (of any version)."""
        return any(prediction_id in index for index in self._index.get(model, {}).values())

    def evict(self, now: float, *, joins_due: AbstractSet[tuple[str, str]] = frozenset()) -> int:
        """Drop parts older than the label wait, and the oldest beyond the row bound; returns rows dropped.

        A part holding a prediction whose waiting label is still to be joined (``joins_due``: (prediction
        id, model)) stays, and the parts behind it (they leave in order), until that join is made or given
        up (the row bound still applies): a prediction consumed already older than the label wait left at the
        next tick, and the join of a label whose transaction was still open as it came was lost with it."""
        dropped = 0
        while self._parts and (self._parts[0].newest_at < now - self.max_age_s or self.rows > self.max_rows):
            b = self._parts[0].batch
            if (
                self.rows <= self.max_rows
                and joins_due
                and any((pid, b.model) in joins_due for pid in b.prediction_ids)
            ):
                break
            part = self._parts.popleft()
            versions = self._index.get(b.model, {})
            index = versions.get(b.version, {})
            for pid in b.prediction_ids:
                hit = index.get(pid)
                if hit is not None and hit[0] is part:
                    del index[pid]
            if not index:
                versions.pop(b.version, None)
            if not versions:
                self._index.pop(b.model, None)
            self.rows -= part.batch.size
            dropped += part.batch.size
        return dropped

    def first_offsets(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for part in self._parts:
            for p, o in part.first_offsets.items():
                out[p] = min(out.get(p, o), o)
        return out


def _plain(x: Any) -> Any:
    f = float(x)
    return None if f != f else f


@dataclass
class IngestResult:
    """What one batch of requests did, for the handler to persist or report."""

    rows: int = 0
    closed: int = 0
    unknown: Counter[ModelKey] = field(default_factory=Counter)
    newly_unknown: list[ModelKey] = field(default_factory=list)
    pending_matches: list[tuple[str, str]] = field(default_factory=list)
    """(prediction id, model) of the held predictions a label waits for (or was joined to lately)."""
    ahead: Counter[str] = field(default_factory=Counter)
    """Rows per model dated further ahead of their arrival than the cache allows (``max_ahead_s``)."""
    past: Counter[str] = field(default_factory=Counter)
    """Rows per model dated further back than the label wait (``max_age_s``) when they came: held only for
    the labels waiting for them."""
    step_rows_not_kept: Counter[str] = field(default_factory=Counter)
    """Rows per model that a rollout step (watched or kept for its start) counted past its bound
    (``LiveState.step_max_rows``) per variant: as many as its kept rows, a uniform sample, leave out."""
    steps_full: list[CanaryStep] = field(default_factory=list)
    """The steps that passed their bound in this batch (on either variant, the first time), each once."""


@dataclass
class LabelJoined:
    """A label's joins, as committed: the versions whose predictions of its id and model it joined, whether
    one of them was a shadow candidate's scoring, and when memory forgets it (monitoring's clock)."""

    versions: set[int]
    shadowed: bool
    until: float


@dataclass
class WindowSettings:
    """Window sizes (from the settings)."""

    rows: int = 5_000
    seconds: float = 300.0
    min_rows: int = 100


class LiveState:
    """Open windows per model version, the label-join cache, and live rollout steps."""

    def __init__(
        self, windows: WindowSettings, cache: PredictionCache, *, step_max_rows: int = 50_000
    ) -> None:
        self.window_settings = windows
        self.cache = cache
        # Per rollout step and variant, at most this many rows (and requests) whose scores, predictions and
        # latencies are kept for its verdict, a uniform sample of them all; the others are counted only. A
        # step collects until its verdict, and a kept one until its start comes (up to
        # rollout_start_wait_seconds): unbounded, a day of a busy model's traffic took gigabytes, once per
        # step that named it.
        self.step_max_rows = step_max_rows
        self.references: dict[ModelKey, ModelReference] = {}
        self.models: set[str] = set()
        """The models of ``references`` (a version of each registered)."""
        self.windows: dict[ModelKey, DriftWindow] = {}
        # Where each version's traffic after its windows done (judged or set aside) starts, per partition
        # (from Postgres): a replayed row before it belongs to a window done. Kept for the whole replay:
        # dropped as the first window rebuilt closed, the judged rows of a partition the replay read later (a
        # poll gives its partitions one after the other) were counted again in the next window, and judged
        # again.
        self.window_starts: dict[ModelKey, dict[int, int]] = {}
        self.closed: deque[ClosedWindow] = deque()
        self.steps: dict[str, CanaryStep] = {}
        # Per rollout, the highest step kept for its RolloutStarted (its step event came first): its traffic
        # is collected as a watched step's is, and handed to the step the start watches. Not collected, the
        # canary's predictions in between counted toward no step until a restart's replay counted them.
        self.kept: dict[str, CanaryStep] = {}
        # Rows skipped for want of a registered version, per (model, version) as events named them: the first
        # UNKNOWN_VERSIONS_LISTED pairs, then together (a publisher can name any number of them).
        self.unknown: Counter[ModelKey] = Counter()
        self.unknown_rows_not_listed = 0
        self.unknown_models_logged: Warned[str] = Warned()
        self.next_offsets: dict[int, int] = {}
        # Labels waiting for their prediction (Postgres's pending_labels), as (prediction id, the model the
        # label names): one per pair, so a label naming another model never stands in this model's way. A
        # prediction of that model is looked for in Postgres; one of another model is not.
        self.pending_labels: set[tuple[str, str]] = set()
        # Held predictions whose model has a label waiting: the background joins them, each in a transaction
        # of its own, so a join that fails for good is the label's failure, never the prediction event's
        # (whose rows are in the windows already). One not found (the label's transaction had not committed
        # yet) is looked for again at the next tick while both are still here.
        self.joins_due: set[tuple[str, str]] = set()
        # Waiting labels being stored, per pair: from their handler's mark until it returns or fails (by then
        # its upsert has run: a join or expiry after it cannot take the earlier label from under it).
        self.labels_storing: Counter[tuple[str, str]] = Counter()
        # While a join or expiry transaction runs (from settle_begins; a failed one leaves it to the next):
        # the pairs whose label was being stored at any moment of it. Its upsert may have come after that
        # transaction took or expired the earlier label, as a new row: that pair still waits in Postgres,
        # and stays in memory.
        self._stored_meanwhile: set[tuple[str, str]] | None = None
        # Labels joined lately (committed in ``labelled``), as (prediction id, model): when memory forgets
        # them, on monitoring's clock, oldest first. A prediction of such a pair consumed after its label was
        # joined (a shadow candidate's scoring of the served row, logged after it, or consumed later from a
        # backlog) is joined with that label too, from Postgres, by the background.
        self.labels_joined: dict[tuple[str, str], float] = {}
        # Their prediction ids per model: the predictions consumer looks for them in a set operation per
        # batch, not a Python loop per row (almost every batch has some label joined lately). Only a served
        # row and its shadow share an id across versions: a shadow's batch looks for every one of them,
        # another batch only for those of labels that joined a shadow's prediction.
        self._joined_ids: dict[str, set[str]] = {}
        self._shadowed_ids: dict[str, set[str]] = {}

    # -- models and windows -------------------------------------------------------------------------

    def add_reference(
        self, ref: ModelReference, *, seq: int = 1, starts: dict[int, int] | None = None
    ) -> None:
        key = (ref.model, ref.version)
        self.references[key] = ref
        self.models.add(ref.model)
        if key not in self.windows:
            self.windows[key] = DriftWindow(ref.model, ref.version, seq)
        if starts:
            self.window_starts[key] = dict(starts)

    def window(self, key: ModelKey) -> DriftWindow:
        return self.windows[key]

    # -- ingestion --------------------------------------------------------------------------------------

    def ingest(self, requests: Sequence[Request], *, arrival: float, replaying: bool = False) -> IngestResult:
        """Add a poll's requests to windows, the label cache and rollout steps; close full windows."""
        result = IngestResult()
        groups: dict[ModelKey, list[tuple[PredictionColumns, int, int]]] = {}
        offsets = dict(self.next_offsets)
        for payload, part, off in requests:
            cols = payload if type(payload) is PredictionColumns else PredictionColumns.of(payload)  # type: ignore[arg-type]
            if off < offsets.get(part, -1):
                # A redelivery after a failed transaction (an outage: nothing else can fail it once its rows
                # are in): its rows are in memory already, and its label joins are due with the background.
                continue
            offsets[part] = off + 1
            groups.setdefault((cols.model, cols.model_version), []).append((cols, part, off))
        # Every row is built before anything is changed: a request that cannot be read fails the poll with
        # nothing in memory, so the one-at-a-time replay that isolates it finds the others still to do.
        batches = {
            key: rows_of(ref, reqs) for key, reqs in groups.items() if (ref := self.references.get(key))
        }
        self.next_offsets = offsets
        for key, reqs in groups.items():
            batch = batches.get(key)
            if batch is None:
                n = sum(c.size for c, _, _ in reqs)
                if key in self.unknown:
                    self.unknown[key] += n
                else:
                    result.newly_unknown.append(key)
                    if len(self.unknown) < UNKNOWN_VERSIONS_LISTED:
                        self.unknown[key] += n
                    else:
                        self.unknown_rows_not_listed += n
                result.unknown[key] += n
                continue
            result.rows += batch.size
            latest = arrival + self.cache.max_ahead_s
            if (batch.request_at > latest).any():
                if not replaying:
                    result.ahead[batch.model] += int((batch.predicted_at > latest).sum())
                # Windowed (its boundaries and time range) and counted toward rollout steps as if dated that
                # far ahead: a window closes by event time, window_seconds after its first request, and one
                # opened by a request dated a year ahead (a serving replica's broken clock, a hand-published
                # event) took every request of its version until window_rows, its time range a year long.
                # The rows keep their date as sent (``predicted_at``: the window file, the joined labels).
                batch = dataclasses.replace(batch, request_at=np.minimum(batch.request_at, latest))
            if not replaying and (past := int((batch.predicted_at < arrival - self.cache.max_age_s).sum())):
                result.past[batch.model] += past
            self._to_windows(key, batch, arrival=arrival, replaying=replaying, result=result)
            self._to_steps(batch, result)
            if self.pending_labels:
                pending, model = self.pending_labels, batch.model
                result.pending_matches.extend(
                    (pid, model) for pid in batch.prediction_ids if (pid, model) in pending
                )
            model = batch.model
            joined_ids = (self._joined_ids if SHADOW in batch.variant else self._shadowed_ids).get(model)
            if joined_ids:
                result.pending_matches.extend(
                    (pid, model) for pid in joined_ids.intersection(batch.prediction_ids)
                )
        return result

    def _to_windows(
        self, key: ModelKey, batch: RowBatch, *, arrival: float, replaying: bool, result: IngestResult
    ) -> None:
        starts = self.window_starts.get(key)
        if replaying and starts:
            keep = np.array(
                [
                    o >= starts.get(p, 0)
                    for p, o in zip(batch.partition.tolist(), batch.offset.tolist(), strict=True)
                ]
            )
            if not keep.all():
                # Rows of windows judged before the restart: only the label cache needs them. They are a
                # prefix of each partition's requests, not of the batch: a poll gives its partitions one after
                # the other, so the version's judged rows of the second follow its new rows of the first.
                judged = self.windows[key].seq - 1
                cuts = [0, *(np.flatnonzero(keep[1:] != keep[:-1]) + 1).tolist(), batch.requests]
                for first, end in pairwise(cuts):
                    run = batch.row_slice(first, end)
                    if keep[first]:
                        self._fill_windows(key, run, arrival=arrival, result=result)
                    else:
                        self.cache.add(run, judged, arrival=arrival)
                return
        self._fill_windows(key, batch, arrival=arrival, result=result)

    def _fill_windows(self, key: ModelKey, batch: RowBatch, *, arrival: float, result: IngestResult) -> None:
        """Add ``batch`` to the version's open window, closing each window it fills."""
        ws = self.window_settings
        while batch.requests:
            win = self.windows[key]
            cut = split_point(
                batch,
                window_rows=ws.rows,
                window_seconds=ws.seconds,
                min_rows=ws.min_rows,
                already=win.rows,
                first_at=win.first_at,
            )
            if cut is None:
                win.add(batch, arrival=arrival)
                self.cache.add(batch, win.seq, arrival=arrival)
                return
            head = batch.row_slice(0, cut)
            win.add(head, arrival=arrival)
            self.cache.add(head, win.seq, arrival=arrival)
            self._close(key)
            result.closed += 1
            batch = batch.row_slice(cut, batch.requests)

    def _close(self, key: ModelKey, *, too_few_rows: bool = False) -> None:
        win = self.windows[key]
        if win.rows:
            self.closed.append(win.close(too_few_rows=too_few_rows))
        self.windows[key] = DriftWindow(win.model, win.version, win.seq + 1)

    def close_idle(self, now: float, *, set_aside_after: float) -> int:
        """Close windows with enough rows that saw no traffic for ``seconds`` (wall clock), to be judged, and
        those with fewer (one at least) that saw none for ``set_aside_after`` (the label wait), to be set
        aside unjudged (``ClosedWindow.too_few_rows``).

        Left open, the window of a version that gets no more traffic (a canary rolled back after a few
        predictions, a version replaced mid-window) held the replay offsets at its first row for ever, and
        every restart read the topic's whole retention. After the label wait its rows are, as a rule, no
        longer held for labels either: the window is all that still holds the replay back."""
        ws = self.window_settings
        closed = 0
        for key, win in list(self.windows.items()):
            idle = now - win.last_arrival
            if win.rows >= ws.min_rows and idle >= ws.seconds:
                self._close(key)
            elif 0 < win.rows < ws.min_rows and idle >= set_aside_after:
                self._close(key, too_few_rows=True)
            else:
                continue
            closed += 1
        return closed

    # -- labels waiting for their prediction --------------------------------------------------------------

    def label_waits(self, prediction_id: str, model: str) -> bool:
        """A label naming ``model`` waits for its prediction (a later one for the same pair replaces it in
        Postgres: one entry here), and is being stored until :meth:`labels_stored`. Returns whether the pair
        is new here: if the transaction storing the label fails, that mark is the one to take back."""
        pair = (prediction_id, model)
        self.labels_storing[pair] += 1
        if self._stored_meanwhile is not None:
            self._stored_meanwhile.add(pair)
        if pair in self.pending_labels:
            return False
        self.pending_labels.add(pair)
        return True

    def labels_stored(
        self, labels: Iterable[tuple[str, str]], *, marked: Iterable[tuple[str, str]] = ()
    ) -> None:
        """The handler that stored these waiting labels (one entry per :meth:`label_waits`) returned, or
        failed: then its transaction stored none of them, and the pairs it ``marked`` new are taken back."""
        for pair in labels:
            self.labels_storing[pair] -= 1
            if self.labels_storing[pair] <= 0:
                del self.labels_storing[pair]
        self.pending_labels.difference_update(marked)

    def settle_begins(self) -> None:
        """A transaction that joins or expires waiting labels begins: note the labels stored meanwhile."""
        self._stored_meanwhile = set(self.labels_storing)

    def labels_settled(self, labels: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """These (prediction id, model) labels, joined or expired by the transaction that began at
        :meth:`settle_begins`, no longer wait in Postgres (that is committed), but for a pair whose label was
        being stored meanwhile. Returns the pairs settled."""
        kept = self._stored_meanwhile or set()
        self._stored_meanwhile = None
        settled = [pair for pair in labels if pair not in kept]
        self.pending_labels.difference_update(settled)
        return settled

    def joins_to_make(self) -> list[tuple[str, str]]:
        """The joins still to make, as (prediction id, model): a label still waits for a held prediction of
        its model. One whose label is being stored again (a correction, or the label sent again) is left for
        the next tick: made now, its join could take the earlier label before the later one's upsert, which
        would then wait on its own."""
        self.joins_due = {
            pair
            for pair in self.joins_due
            if (pair in self.pending_labels or pair in self.labels_joined)
            and self.cache.holds(pair[1], pair[0])
        }
        return sorted(pair for pair in self.joins_due if pair not in self.labels_storing)

    def labels_joined_now(self, joined: dict[tuple[str, str], LabelJoined]) -> bool:
        """These labels' joins, per (prediction id, model), are committed: remember them for the predictions
        of their pair still to come. A version held now that they did not join (consumed while their
        transaction ran), where a shadow is on either side, is due for a join. Returns whether any is."""
        order = sorted(joined.items(), key=lambda item: item[1].until)
        self.remember_joined(((pair, j.until, j.shadowed) for pair, j in order), bound=self.cache.max_rows)
        due = False
        for (prediction_id, model), j in joined.items():
            if any(
                hit.version not in j.versions and (j.shadowed or hit.variant == SHADOW)
                for hit in self.cache.predictions(model, prediction_id)
            ):
                self.joins_due.add((prediction_id, model))
                due = True
        return due

    def remember_joined(self, pairs: Iterable[tuple[tuple[str, str], float, bool]], *, bound: int) -> None:
        """Remember joined labels' pairs until their time, and whether they joined a shadow's prediction (in
        the order given, which is the order they are forgotten in), at most ``bound`` of them: the oldest go
        first."""
        joined = self.labels_joined
        for pair, until, shadowed in pairs:
            prediction_id, model = pair
            if pair in joined:  # remembered again (a correction): as long as the latest, shadowed if ever
                shadowed = shadowed or prediction_id in self._shadowed_ids.get(model, ())
                self._forget(pair)
            joined[pair] = until
            self._joined_ids.setdefault(model, set()).add(prediction_id)
            if shadowed:
                self._shadowed_ids.setdefault(model, set()).add(prediction_id)
        while len(joined) > bound:
            self._forget(next(iter(joined)))

    def forget_joined(self, now: float) -> None:
        """Forget the joined labels whose time is up: a prediction of their pair consumed from now on is not
        joined with them (it is older than the label wait, as a label that comes for it is)."""
        joined = self.labels_joined
        while joined:
            pair, until = next(iter(joined.items()))
            if until >= now:
                return
            self._forget(pair)

    def _forget(self, pair: tuple[str, str]) -> None:
        del self.labels_joined[pair]
        prediction_id, model = pair
        for index in (self._joined_ids, self._shadowed_ids):
            ids = index.get(model)
            if ids is not None:
                ids.discard(prediction_id)
                if not ids:
                    del index[model]

    # -- rollouts ---------------------------------------------------------------------------------------

    def watch(self, step: CanaryStep) -> None:
        """Start collecting a rollout step's traffic (replacing the rollout's previous step)."""
        self.steps[step.rollout_id] = step

    def unwatch(self, rollout_id: str, step_index: int | None = None) -> None:
        """Stop watching the rollout (finished), or only its step ``step_index`` (decided) if still on it."""
        step = self.steps.get(rollout_id)
        if step is not None and (step_index is None or step.step_index == step_index):
            del self.steps[rollout_id]

    def keep(self, step: CanaryStep) -> None:
        """Collect the traffic of a step kept for its rollout's start (the rollout's highest kept step)."""
        kept = self.kept.get(step.rollout_id)
        if kept is None or kept.step_index < step.step_index:
            self.kept[step.rollout_id] = step

    def take_kept(self, rollout_id: str, step_index: int | None = None) -> CanaryStep | None:
        """Stop collecting the rollout's kept step (or only step ``step_index``); returns it if it was."""
        kept = self.kept.get(rollout_id)
        if kept is None or (step_index is not None and kept.step_index != step_index):
            return None
        return self.kept.pop(rollout_id)

    def _to_steps(self, batch: RowBatch, result: IngestResult) -> None:
        most = self.step_max_rows
        predictions: np.ndarray | None = None
        for step in chain(self.steps.values(), self.kept.values()):
            if step.model != batch.model:
                continue
            variants = batch.variant
            if batch.version == step.canary_version:
                rollout = step.rollout_id
                mask = np.array(
                    [canary_evidence(v, r, rollout) for v, r in zip(variants, batch.rollout_id, strict=True)]
                )
                side = step.canary
            elif batch.version == step.stable_version:
                mask = np.array([v == Variant.STABLE.value for v in variants])
                side = step.stable
            else:
                continue
            mask &= batch.request_at >= step.started_at
            if not mask.any():
                continue
            idx = np.flatnonzero(np.repeat(mask, batch.request_rows))
            if predictions is None:
                # Once per batch, an object array: a step's rows are then taken as numpy takes the others.
                predictions = np.fromiter(batch.prediction, dtype=object, count=batch.size)
            full = step.canary.rows_not_kept == 0 and step.stable.rows_not_kept == 0
            sampled_out = side.rows_not_kept
            side.add(
                batch.predicted_at[idx],
                batch.score[idx],
                predictions[idx],
                batch.latency_ms[mask],
                most=most,
            )
            if side.rows_not_kept > sampled_out:
                result.step_rows_not_kept[step.model] += side.rows_not_kept - sampled_out
                if full:
                    result.steps_full.append(step)
            # The least, not the first counted: a poll is ingested version by version, so the stable version's
            # rows of a partition can come before the canary's earlier ones there.
            firsts = step.first_offsets
            for p, o in zip(batch.partition[mask].tolist(), batch.offset[mask].tolist(), strict=True):
                firsts[p] = min(firsts.get(p, o), o)

    # -- restart support --------------------------------------------------------------------------------

    def hold_offsets(self) -> dict[int, int]:
        """Per partition, the first offset whose rows are still only in memory: replay starts there."""
        holds: dict[int, int] = dict(self.next_offsets)

        def hold(offsets: dict[int, int]) -> None:
            for p, o in offsets.items():
                holds[p] = min(holds.get(p, o), o)

        for win in self.windows.values():
            hold(win.first_offsets)
        for closed in self.closed:
            hold(closed.first_offsets)
        for step in chain(self.steps.values(), self.kept.values()):
            hold(step.first_offsets)
        hold(self.cache.first_offsets())
        return holds

    def skipped_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The rows skipped for want of a registered version (``unknown``), as ``/v1/status`` shows them: of
        versions still unknown, and of versions registered since (whose earlier rows stay skipped); those of
        pairs past the listed ones are in :attr:`unknown_rows_not_listed`."""
        unknown: list[dict[str, Any]] = []
        registered_since: list[dict[str, Any]] = []
        for (model, version), rows in sorted(self.unknown.items()):
            entry = {"model": model, "version": version, "rows_skipped": rows}
            (registered_since if (model, version) in self.references else unknown).append(entry)
        return unknown, registered_since

    def unknown_models_to_log(self, keys: Iterable[ModelKey]) -> list[str]:
        """Models not logged yet as unknown: one log line per model, not per message (per model remembered:
        past ``WARNED_KEYS_KEPT`` models the least lately seen is logged again if it comes back)."""
        return [model for model, _ in keys if self.unknown_models_logged.due(model)]
