"""The Evaluator port on the artifact store: models (skops, trusted types only), holdouts and specs are
loaded by key and verified; the measuring runs in a thread so the event loop keeps serving.

Every artifact follows one rule. The store failing for a moment (unreachable, timing out) is tried again
in place, a bounded number of times (the store's ``attempts``); an artifact that is missing, corrupted
(its bytes do not hash to its key), untrusted or not readable as what it should be fails its check at once,
except the champion's model: then the comparison with it cannot be measured, and the candidate is judged on
its absolute checks (``Measured.champion_unloadable`` says why, or ``EvaluationError.champion_unloadable``
when a check of the candidate's own fails it; the handler logs and counts it once the report is committed).
When the store still fails after its last try, no check fails: ``StoreUnavailable`` (an OSError) goes to the
bus, which retries the event without limit as for any outage of the infrastructure. A candidate is judged
once, for good, so an outage must not judge it."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import pandas as pd

from contracts.common import ArtifactFormat, ArtifactRef
from libs.artifacts import (
    ArtifactCorrupted,
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    UntrustedArtifact,
    load_model,
)
from libs.csv_tables import read_csv_table
from libs.modelspec import SpecError, ValidationSpec, load_canonical
from services.validation.domain import ChampionProblem, ChampionUnloadable, Measured
from services.validation.ports import Evaluation, EvaluationError
from services.validation.scoring import CandidateFailed, HoldoutMismatch, HoldoutUnlabelled, measure


def preload() -> None:
    """Import what loading and scoring models needs (skops, estimators, pyarrow) ahead of the first use."""
    import pyarrow.parquet  # noqa: F401
    import skops.io  # noqa: F401

    from libs.modelspec import import_estimators

    import_estimators()


class StoreEvaluator:
    """Reads artifacts from the store and measures with scoring.measure."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        latency_repeats: int = 7,
        latency_batch_rows: int = 1000,
        max_slice_levels: int = 10_000,
    ) -> None:
        self.store = store
        self.latency_repeats = latency_repeats
        self.latency_batch_rows = latency_batch_rows
        self.max_slice_levels = max_slice_levels

    async def validation_spec(self, spec: ArtifactRef) -> ValidationSpec:
        try:
            data = await asyncio.to_thread(self.store.get, spec.key)
            return load_canonical(data).validation
        except (ArtifactError, SpecError) as exc:
            raise EvaluationError(
                "spec-readable", f"the model spec {spec.key[:12]} cannot be used: {exc}"
            ) from exc

    async def measure(self, evaluation: Evaluation) -> Measured:
        return await asyncio.to_thread(self._measure, evaluation)

    def _measure(self, evaluation: Evaluation) -> Measured:
        # The champion first: production's model that cannot be loaded is said (logged, counted) for every
        # candidate measured, one failing a check of its own as well (it went unsaid before).
        champion: object | None = None
        unloadable: ChampionUnloadable | None = None
        if evaluation.champion is not None:
            try:
                champion = self._model(evaluation.champion, "champion")
            except ArtifactError as exc:
                # Only a champion that is definitely unloadable; the store failing (StoreUnavailable, an
                # OSError) is no ArtifactError and goes to the bus, which retries the event.
                unloadable = ChampionUnloadable(
                    reason=_problem(exc),
                    detail=f"the champion model {evaluation.champion.key[:12]} cannot be loaded: {exc}",
                )
        try:
            measured = self._measure_candidate(evaluation, champion, unloadable)
        except EvaluationError as exc:
            exc.champion_unloadable = unloadable
            raise
        return dataclasses.replace(measured, champion_unloadable=unloadable) if unloadable else measured

    def _measure_candidate(
        self, evaluation: Evaluation, champion: object | None, unloadable: ChampionUnloadable | None
    ) -> Measured:
        try:
            candidate = self._model(evaluation.candidate, "candidate")
        except ArtifactError as exc:
            raise EvaluationError(
                "candidate-loads",
                f"the candidate model {evaluation.candidate.key[:12]} cannot be loaded: {exc}",
            ) from exc
        key, fmt = evaluation.holdout.key, evaluation.holdout.format
        try:
            data = self.store.get(key)
        except ArtifactError as exc:
            raise EvaluationError(
                "holdout-readable", f"the holdout {key[:12]} cannot be read: {exc}"
            ) from exc
        try:
            holdout = read_csv_table(data) if fmt is ArtifactFormat.CSV else pd.read_parquet(io.BytesIO(data))
        except MemoryError:
            raise  # the machine's as much as the file's (pyarrow's ArrowMemoryError too): the bus retries
        except Exception as exc:  # whatever the reader makes of bytes that are not a table: the file's fault
            raise EvaluationError(
                "holdout-readable", f"the holdout {key[:12]} is not a readable {fmt.value} file: {exc}"
            ) from exc
        try:
            return measure(
                evaluation.spec,
                candidate=candidate,
                signature=evaluation.signature,
                holdout=holdout,
                champion=champion,
                champion_signature=evaluation.champion_signature if unloadable is None else None,
                seed=evaluation.seed,
                latency_repeats=self.latency_repeats,
                latency_batch_rows=self.latency_batch_rows,
                max_slice_levels=self.max_slice_levels,
            )
        except HoldoutMismatch as exc:
            raise EvaluationError("holdout-matches-signature", str(exc)) from exc
        except HoldoutUnlabelled as exc:
            raise EvaluationError("holdout-labelled", str(exc)) from exc
        except CandidateFailed as exc:
            # Only what the candidate's own calls raised (scoring.measure wraps them): any other error of
            # measuring is validation's (a bug, retried then dead-lettered) or the infrastructure's (retried),
            # never a verdict on the candidate.
            raise EvaluationError(
                "candidate-scores", f"the candidate cannot score the holdout: {exc}"
            ) from exc

    def _model(self, ref: ArtifactRef, who: str) -> object:
        """The ``who`` model (candidate or champion); raises ArtifactError when it cannot be loaded, and the
        MemoryError that loading it met, if any: the machine's as much as the artifact's, it goes to the bus,
        which retries, then dead-letters the registration. libs.artifacts makes whatever skops raises the
        artifact's fault, so a champion short of memory passed for unloadable (the comparison skipped, the
        candidate judged on its absolute checks alone) and a candidate failed candidate-loads for good."""
        try:
            return load_model(self.store, ref.key)
        except ArtifactError as exc:
            if isinstance(exc.__cause__, MemoryError):
                raise exc.__cause__ from None
            raise


def _problem(exc: ArtifactError) -> ChampionProblem:
    if isinstance(exc, ArtifactNotFound):
        return "missing"
    if isinstance(exc, ArtifactCorrupted):
        return "corrupted"
    if isinstance(exc, UntrustedArtifact):
        return "untrusted"
    return "unloadable"
