"""The in-memory routing table every replica serves from, and how it follows the persisted state.

The table is immutable; a new one is built off to the side (models loaded and warmed first) and put in
place with one reference assignment, so a request sees either the old table or the new one, never half
of each, and a swap can neither drop nor fail a request.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import pandas as pd

from contracts.common import FeatureType, ModelSignature, Task
from contracts.predictions import Variant
from contracts.rollouts import RolloutMode
from libs.errors import Unavailable
from libs.logging import get_logger
from services.serving.compiled import ONNX, SKLEARN, CompiledModel, frame
from services.serving.domain import MISSING, FeatureColumns, ModelRoute, RouteView, Scores
from services.serving.metrics import LOOP_FAILURES, UNCOMPILED, keep_served, show_rollouts
from services.serving.ports import ModelLoader, ModelLoadError, VersionRecord

log = get_logger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One model version in memory: the estimator, its signature and, when one was verified, a compiled
    copy that answers instead of the estimator (services/serving/compiled.py)."""

    model: str
    version: int
    artifact_key: str
    signature: ModelSignature
    estimator: Any
    compiled: CompiledModel | None = None
    engine_note: str = ""
    """Why the estimator serves, when no compiled copy does."""

    @cached_property
    def classes(self) -> list[Any] | None:
        """Class labels in the order of ``predict_proba``'s columns, for classifiers."""
        cls = getattr(self.estimator, "classes_", None)
        if cls is not None:
            return list(np.asarray(cls).tolist())
        return self.signature.classes

    @cached_property
    def gives_probabilities(self) -> bool:
        return self.signature.task is Task.CLASSIFICATION and hasattr(self.estimator, "predict_proba")

    @property
    def engine(self) -> str:
        """What computes the answers: ``onnxruntime`` (a verified compiled copy) or ``scikit-learn``."""
        return ONNX if self.compiled is not None else SKLEARN

    def frame(self, columns: FeatureColumns) -> pd.DataFrame:
        return frame(self.signature, columns)

    def _outputs(self, columns: FeatureColumns) -> np.ndarray:
        """The model's outputs, finite: one that is not is the model's failure (503), never an answer (JSON
        would carry NaN as null)."""
        compiled = self.compiled
        if compiled is not None and (self.gives_probabilities or self.signature.task is Task.REGRESSION):
            feeds = compiled.feeds(columns)
            if feeds is not None:
                out = compiled.run(feeds)
                if np.isfinite(out).all():
                    return out
                # Inputs are within float32's range, but the graph's float32 arithmetic can still overflow
                # on values near its limit; the pipeline computes in float64.
            UNCOMPILED.labels(self.model, str(self.version)).inc()
        x = self.frame(columns)
        out = np.asarray(
            self.estimator.predict_proba(x) if self.gives_probabilities else self.estimator.predict(x)
        )
        if out.dtype.kind in "fc" and not np.isfinite(out).all():
            raise Unavailable(
                f"model {self.model} version {self.version} gave a non-finite "
                f"{'probability' if self.gives_probabilities else 'output'} for these inputs"
            )
        return out

    def predict(self, columns: FeatureColumns) -> Scores:
        """Score checked rows (CPU-bound; from tens of microseconds compiled to milliseconds)."""
        out = self._outputs(columns)
        if self.gives_probabilities:
            classes = self.classes or []
            # argmax over predict_proba is what predict does for these estimators; one pass instead of two.
            index = out.argmax(axis=1)
            labels = np.asarray(classes, dtype=object)[index].tolist()
            return Scores(labels, out.tolist(), classes, array=out, label_index=index)
        return Scores(out.reshape(len(out), -1)[:, 0].tolist() if out.ndim > 1 else out.tolist(), None, None)

    def warm(self) -> None:
        """Score one synthetic row, so the first real request pays no lazy initialisation."""
        row: dict[str, list[Any]] = {}
        for spec in self.signature.features:
            if spec.type is FeatureType.NUMERIC:
                row[spec.name] = [0.0]
            else:
                row[spec.name] = [spec.categories[0] if spec.categories else MISSING]
        self.predict(FeatureColumns(1, row))


@dataclass(frozen=True)
class ModelRouting:
    """How one model's requests are answered right now."""

    model: str
    stable: ServedModel | None
    canary: ServedModel | None
    rollout_id: str | None
    weight: float
    mode: RolloutMode
    step_index: int

    @property
    def view(self) -> RouteView:
        return RouteView(
            rollout_id=self.rollout_id,
            weight=self.weight,
            mode=self.mode,
            has_stable=self.stable is not None,
            has_canary=self.canary is not None,
        )

    def serving(self, variant: Variant) -> ServedModel | None:
        return self.canary if variant in (Variant.CANARY, Variant.SHADOW) else self.stable

    def by_version(self, version: int) -> tuple[ServedModel, Variant] | None:
        """The loaded version and its variant, for requests that name a version."""
        if self.stable is not None and self.stable.version == version:
            return self.stable, Variant.STABLE
        if self.canary is not None and self.canary.version == version:
            return self.canary, Variant.SHADOW if self.mode is RolloutMode.SHADOW else Variant.CANARY
        return None

    @property
    def versions(self) -> list[int]:
        return sorted({m.version for m in (self.stable, self.canary) if m is not None})

    @property
    def default(self) -> ServedModel | None:
        return self.stable or self.canary


@dataclass(frozen=True)
class RoutingTable:
    """Every served model's routing; replaced whole, never changed in place."""

    models: Mapping[str, ModelRouting] = field(default_factory=dict)
    held: frozenset[str] = frozenset()
    """Models with no routing here because the store failed to give their versions (:class:`TableBuild`)
    and none was served before: a request for one answers 503, to try again, not 404 as for an unknown
    model (a replica starting while the store is away is ready for its other models)."""

    @property
    def served(self) -> set[tuple[str, int]]:
        """Every (model, version) the table serves, stable or candidate."""
        return {(r.model, v) for r in self.models.values() for v in r.versions}

    @property
    def live_steps(self) -> set[tuple[str, str, int]]:
        """(model, rollout id, step index) of every live rollout the table routes."""
        return {(m, r.rollout_id, r.step_index) for m, r in self.models.items() if r.rollout_id is not None}

    @property
    def rollouts(self) -> dict[str, tuple[str, float, int]]:
        """Model -> (mode, canary weight, step index) of every live rollout the table routes."""
        return {
            m: (r.mode.value, r.weight, r.step_index)
            for m, r in self.models.items()
            if r.rollout_id is not None
        }

    @property
    def artifact_keys(self) -> set[str]:
        """The artifact of every model the table serves, stable or candidate."""
        return {m.artifact_key for r in self.models.values() for m in (r.stable, r.canary) if m is not None}


class RoutingState:
    """Holds the current table; readers take ``table`` once per request."""

    def __init__(self) -> None:
        self.table = RoutingTable()
        self.synced = asyncio.Event()

    def swap(self, table: RoutingTable) -> None:
        """Put a fully built table in place (one reference assignment), and drop the series of the versions
        it no longer serves."""
        self.table = table
        self.synced.set()
        # Here, not per request: no request runs between the assignment and this (both on the event loop),
        # and no version this table serves loses a series.
        keep_served(table.served)
        show_rollouts(table.rollouts)


class RoutingSource(Protocol):
    """Where the persisted routing state is read from, and how a change is noticed."""

    async def snapshot(self) -> list[tuple[ModelRoute, dict[int, VersionRecord]]]:
        """Every model's route with the records of the versions it serves."""
        ...

    async def wait_for_change(self, timeout_s: float) -> None:
        """Return when the state may have changed (a notification), or after ``timeout_s``."""
        ...


@dataclass(frozen=True)
class TableBuild:
    """A table built for a snapshot, and the models it kept as the current table routes them."""

    table: RoutingTable
    held: Mapping[str, str] = field(default_factory=dict)
    """Model -> the version and the error that kept it from its new routing (an infrastructure failure
    loading one of its versions): it routes in ``table`` as it did before, or not at all if it did not."""


async def build_table(
    snapshot: Sequence[tuple[ModelRoute, dict[int, VersionRecord]]],
    loader: ModelLoader,
    current: RoutingTable,
    failing: Collection[tuple[str, int]] = (),
) -> TableBuild:
    """A table for the persisted state; models are loaded and warmed before the table exists.

    A version that cannot load (:class:`ModelLoadError`: its artifact or warm-up at fault) serves nothing,
    and its model routes without it; it is logged as an error, unless it is among the (model, version)
    ``failing`` already (the sync tries those again at every re-read). Any other failure loading a version
    (the store unreachable or timing out: the loader raises it as it is) is no fault of the version, and
    only its model's: that model keeps its routing in ``current`` whole (never a new stable beside the old
    canary, nor a rollout without its candidate), nothing is remembered against the version, and the
    build goes on with the other models, whose changes (a promotion, a rollback) need not wait for the
    store. The held models are returned for the sync to count, log and try again."""
    held: dict[str, str] = {}

    async def served(record: VersionRecord | None) -> ServedModel | None:
        if record is None or not record.registered:
            return None
        old = current.models.get(record.model)
        for m in (old.stable, old.canary) if old else ():
            if m is not None and m.version == record.version and m.artifact_key == record.artifact_key:
                return m
        try:
            model: ServedModel = await loader.load(record)
            return model
        except ModelLoadError as exc:
            report = log.debug if (record.model, record.version) in failing else log.error
            report(
                "model version cannot be served", model=record.model, version=record.version, error=str(exc)
            )
            return None
        except Exception as exc:
            held[record.model] = f"version {record.version}: {exc!r}"
            return None

    models: dict[str, ModelRouting] = {}
    for route, records in snapshot:
        stable = await served(records.get(route.stable_version)) if route.stable_version else None
        live = route.active
        canary = await served(records.get(live.canary_version)) if live and route.model not in held else None
        if route.model in held:
            previous = current.models.get(route.model)
            if previous is not None:
                models[route.model] = previous
            continue
        if stable is None and canary is None:
            continue
        models[route.model] = ModelRouting(
            model=route.model,
            stable=stable,
            canary=canary,
            rollout_id=live.rollout_id if live else None,
            weight=live.weight if live else 0.0,
            mode=live.mode if live else RolloutMode.CANARY,
            step_index=live.step_index if live else 0,
        )
    return TableBuild(RoutingTable(models, frozenset(held.keys() - models.keys())), held)


def routing_key(snapshot: Sequence[tuple[ModelRoute, dict[int, VersionRecord]]]) -> tuple[Any, ...]:
    """What decides routing in a snapshot (not the sample counts, which change all the time)."""
    key = []
    for route, records in snapshot:
        live = route.active
        key.append(
            (
                route.model,
                route.stable_version,
                (live.rollout_id, live.canary_version, live.step_index, live.mode) if live else None,
                tuple(sorted((v, r.artifact_key) for v, r in records.items())),
            )
        )
    return tuple(sorted(key, key=lambda k: k[0]))


def same_routing(a: RoutingTable, b: RoutingTable) -> bool:
    """Whether two tables route every request alike, with the very same loaded models."""

    def shape(r: ModelRouting) -> tuple[Any, ...]:
        return (id(r.stable), id(r.canary), r.rollout_id, r.weight, r.mode, r.step_index)

    return (
        a.held == b.held
        and a.models.keys() == b.models.keys()
        and all(shape(r) == shape(b.models[m]) for m, r in a.models.items())
    )


def unserved(
    snapshot: Sequence[tuple[ModelRoute, dict[int, VersionRecord]]], table: RoutingTable
) -> set[tuple[str, int]]:
    """The registered versions the persisted routes put on traffic (stable, live canary) that the table
    does not serve: their load failed on this replica."""
    wanted: set[tuple[str, int]] = set()
    for route, records in snapshot:
        live = route.active
        for version in (route.stable_version, live.canary_version if live else None):
            record = records.get(version) if version is not None else None
            if record is not None and record.registered:
                wanted.add((route.model, record.version))
    return wanted - table.served


class RoutingSync:
    """Keeps one replica's table equal to the persisted state: on every notification, and every
    ``poll_s`` in case a notification was lost with a connection."""

    def __init__(
        self, state: RoutingState, source: RoutingSource, loader: ModelLoader, *, poll_s: float = 2.0
    ) -> None:
        self.state = state
        self.source = source
        self.loader = loader
        self.poll_s = poll_s
        self._stopping = False
        self._last: tuple[Any, ...] | None = None
        self._failing: set[tuple[str, int]] = set()

    async def sync_once(self) -> bool:
        """Rebuild the table if the state changed; returns whether it did."""
        snapshot = await self.source.snapshot()
        key = routing_key(snapshot)
        if key == self._last and self.state.synced.is_set():
            return False
        built = await build_table(snapshot, self.loader, self.state.table, self._failing)
        table = built.table
        if built.held:
            # Counted as a round that failed whole is (the same loop, the same alert): a count that keeps
            # rising is a replica where these models stay on stale routing.
            LOOP_FAILURES.labels("routing-sync").inc()
            log.warning(
                "routing sync failed for some models, they keep their routing, retrying",
                models=dict(built.held),
            )
        # A version this replica could not load is tried again at the next sync (the loader holds off its
        # retries for a while), and so is a model held back: both at the next notification or poll, with no
        # other change needed. Taken as done, the key would leave the replica without them until some other
        # routing change came: with nothing of the model to serve once that version was promoted. A held
        # model's versions are not failing ones: a load error of theirs, once the store answers, is news.
        self._failing = {(m, v) for m, v in unserved(snapshot, table) if m not in built.held}
        self._last = None if self._failing or built.held else key
        if self.state.synced.is_set() and same_routing(table, self.state.table):
            return False  # a retry that loaded nothing new
        self.state.swap(table)
        # Whatever this table does not serve leaves the loader's cache: promoted over, rolled back, replaced,
        # or loaded by a handler for a table still to come (the next rebuild loads that one again). A request
        # or a queued shadow scoring that took an older table still holds its models until it ends.
        self.loader.keep_served(table.artifact_keys)
        # The loaded models are a few hundred thousand long-lived objects: left to the collector, every
        # full collection walks them all (100-200 ms on this machine, on the event loop: the p99 of
        # 100-row requests while the prediction log keeps their rows alive). Frozen, it walks only what
        # requests allocate. Freezing does not keep a model alive: once neither the table, the loader nor a
        # request holds it, its reference count frees it (tests/unit/serving/test_loaded_models.py).
        # Collected first: freezing moves every tracked object, garbage included, where no collection looks
        # again, so cycles waiting for the collector at a swap (a failed call's exception and traceback,
        # holding its request's rows; an error-rate rollback's swap follows a run of them) were kept for the
        # process's life, some more at every routing change. The collection walks only what is not frozen
        # yet: the versions this swap loaded, and what requests hold.
        gc.collect()
        gc.freeze()
        log.info(
            "routing updated",
            models={
                m: {
                    "stable": r.stable.version if r.stable else None,
                    "canary": r.canary.version if r.canary else None,
                    "weight": r.weight,
                }
                for m, r in table.models.items()
            },
        )
        return True

    async def run(self) -> None:
        """Follow the state until stopped."""
        delay = 0.2
        while not self._stopping:
            try:
                await self.sync_once()
                delay = 0.2
                await self.source.wait_for_change(self.poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                LOOP_FAILURES.labels("routing-sync").inc()
                log.warning("routing sync failed, retrying", error=repr(exc), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        self._stopping = True
