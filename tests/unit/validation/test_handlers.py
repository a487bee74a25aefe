"""Validation's handlers on fakes, with real models trained by the training worker on generated data."""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.common import ArtifactFormat, ArtifactRef, DatasetRef, Lineage, ModelSignature, Stage
from contracts.envelope import CloudEvent, new_event
from contracts.examples import EXAMPLES
from contracts.models import AppliedStageChange, ModelStageChanged, ModelVersionRegistered
from contracts.registry import EVENT_TYPES
from contracts.validation import CheckKind, ValidationFailed, ValidationPassed
from libs.artifacts import ArtifactStore, save_model
from libs.bus import InMemoryBus, Subscription, Transaction, bytes_over_limit
from libs.modelspec import ModelSpec, SliceRule, ValidationSpec, build_pipeline, spec_from_data
from services.training.worker import run_training, signature
from services.validation.adapters.evaluator import StoreEvaluator
from services.validation.domain import ChampionUnloadable, Measured, SliceMeasure, SlicesLeftOut
from services.validation.handlers import HANDLERS, report_for_version
from services.validation.ports import Evaluation, Evaluator, Report, VersionRecord
from tests.stage_changes import stage_change
from tests.unit.training.data import churn_frame, churn_spec, churn_spec_data, put_frame

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class FakeVersions:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], VersionRecord] = {}

    async def record(self, r: ModelVersionRegistered) -> None:
        self.rows.setdefault(
            (r.model, r.model_version),
            VersionRecord(r.model, r.model_version, r.artifact, r.signature, r.metrics, r.lineage),
        )

    async def get(self, model: str, version: int) -> VersionRecord | None:
        return self.rows.get((model, version))


class FakeChampions:
    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.changes: dict[str, AppliedStageChange] = {}

    async def get(self, model: str) -> int | None:
        return self.rows.get(model)

    async def set(self, model: str, version: int) -> None:
        self.rows[model] = version

    async def clear(self, model: str, version: int) -> None:
        if self.rows.get(model) == version:
            del self.rows[model]

    async def last_change(self, model: str) -> AppliedStageChange | None:
        return self.changes.get(model)

    async def keep_change(self, model: str, change: AppliedStageChange) -> None:
        self.changes[model] = change


class FakeDatasets:
    async def record(self, registered: Any) -> None:
        return None

    async def artifact(self, ref: DatasetRef) -> None:
        return None  # unknown: the handler falls back to the sha256, which is the store key


class FakeReports:
    def __init__(self) -> None:
        self.rows: dict[str, Report] = {}

    async def save(self, report: Report) -> None:
        assert report.report_id not in self.rows
        self.rows[report.report_id] = report

    async def get(self, report_id: str) -> Report | None:
        return self.rows.get(report_id)

    async def for_version(self, model: str, version: int) -> Report | None:
        return next((r for r in self.rows.values() if (r.model, r.version) == (model, version)), None)


class Gate:
    """Validation's handlers on an in-memory bus, a temporary artifact store and trained models."""

    def __init__(
        self, root: Path, *, max_event_bytes: int = 1_000_000, evaluator: Evaluator | None = None
    ) -> None:
        self.url = str(root)
        self.store = ArtifactStore(self.url)
        self.versions, self.champions, self.reports = FakeVersions(), FakeChampions(), FakeReports()
        self.bus = InMemoryBus(EVENT_TYPES, max_event_bytes=max_event_bytes)
        evaluator = evaluator or StoreEvaluator(self.store, latency_repeats=3)

        def bind(handler: Any) -> Any:
            async def run(event: CloudEvent[Any], tx: Transaction) -> None:
                await handler(
                    event,
                    versions=self.versions,
                    champions=self.champions,
                    datasets=FakeDatasets(),
                    reports=self.reports,
                    evaluator=evaluator,
                    publish=tx.publish,
                    after_commit=tx.after_commit,
                    source="/driftloop/validation",
                    max_event_bytes=max_event_bytes,
                )

            return run

        self.bus.subscribe(
            Subscription(
                consumer="validation",
                topics=["mlops.models", "mlops.datasets"],
                handlers={p: bind(h) for p, h in HANDLERS.items()},
            )
        )

    def train(self, spec: ModelSpec, version: int, frame: Any) -> ModelVersionRegistered:
        """A version as the registry would announce it, from a real training run."""
        spec_ref = self.store.put(spec.canonical_json())
        base = put_frame(self.store, frame)
        result = run_training(
            {
                "job_id": f"job-{version}",
                "model": spec.name,
                "spec_key": spec_ref.sha256,
                "datasets": [{"name": "churn-base", "version": 1, "sha256": base.key}],
                "artifacts_url": self.url,
            }
        )
        assert result["ok"], result
        holdout = result["holdout"]
        return ModelVersionRegistered(
            model=spec.name,
            model_version=version,
            run_id=f"run-{version}",
            job_id=f"job-{version}",
            artifact=result["artifact"],
            profile=result["profile"],
            signature=ModelSignature.model_validate(result["signature"]),
            metrics=result["metrics"],
            lineage=Lineage(
                datasets=[DatasetRef(name="churn-base", version=1, sha256=base.key)],
                holdout=DatasetRef(
                    name="churn-holdout",
                    version=version,
                    sha256=holdout["artifact"]["key"],
                    rows=holdout["rows"],
                ),
                spec_hash=spec.spec_hash(),
                spec={
                    "key": spec_ref.sha256,
                    "uri": spec_ref.uri,
                    "format": "json",
                    "size_bytes": spec_ref.size,
                },
                code_version="test",
                seed=spec.seed,
            ),
        )

    async def register(self, registered: ModelVersionRegistered) -> None:
        await self.bus.publish(new_event(registered, source="/driftloop/registry"))
        await self.bus.drain()

    async def promote(self, model: str, version: int) -> None:
        change = ModelStageChanged(
            model=model,
            model_version=version,
            from_stage=Stage.CANARY,
            to_stage=Stage.PRODUCTION,
            reason="test",
        )
        await self.bus.publish(new_event(change, source="/driftloop/registry"))
        await self.bus.drain()


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path)


async def test_first_version_passes_with_champion_checks_skipped(gate: Gate) -> None:
    await gate.register(gate.train(churn_spec(), 1, churn_frame()))
    [passed] = gate.bus.events(of=ValidationPassed)
    checks = {c.name: c for c in passed.data.checks}
    assert "no champion" in checks["challenger-vs-champion:roc_auc"].detail
    assert checks["roc_auc>=0.75"].passed and checks["roc_auc>=0.75"].value > 0.8
    assert {"slice:plan=basic:roc_auc", "slice:plan=plus:roc_auc", "slice:plan=premium:roc_auc"} <= set(
        checks
    )
    assert passed.data.champion_version is None
    report = await report_for_version("churn", 1, reports=gate.reports)
    assert report.passed and report.event_id == passed.id


async def test_deliberately_worse_candidate_fails_naming_the_failing_checks(gate: Gate) -> None:
    await gate.register(gate.train(churn_spec(), 1, churn_frame()))
    await gate.promote("churn", 1)
    # Two weak features only (x2, x3 carry no signal): a much worse model on the same kind of data.
    weak = churn_spec(
        features=[{"name": "x2", "type": "numeric"}, {"name": "x3", "type": "numeric"}],
        validation={"thresholds": {"roc_auc": 0.75}, "champion": {"max_degradation": 0.02, "resamples": 200}},
    )
    await gate.register(gate.train(weak, 2, churn_frame()))
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.champion_version == 1
    assert "challenger-vs-champion:roc_auc" in failed.data.failed_checks
    assert "roc_auc>=0.75" in failed.data.failed_checks
    assert "signature-compatible" in failed.data.failed_checks  # it dropped features clients send


async def test_retrained_candidate_as_good_as_the_champion_passes(gate: Gate) -> None:
    await gate.register(gate.train(churn_spec(), 1, churn_frame(seed=0)))
    await gate.promote("churn", 1)
    await gate.register(gate.train(churn_spec(), 2, churn_frame(1500, seed=1)))
    passed = gate.bus.events(of=ValidationPassed)
    assert [e.data.model_version for e in passed] == [1, 2]
    check = next(c for c in passed[1].data.checks if c.name == "challenger-vs-champion:roc_auc")
    assert check.interval is not None and check.passed


async def test_redelivered_registration_is_not_validated_twice(gate: Gate) -> None:
    event = new_event(gate.train(churn_spec(), 1, churn_frame()), source="/driftloop/registry")
    await gate.bus.publish(event)
    await gate.bus.publish(event)
    await gate.bus.drain()
    assert len(gate.bus.events(of=ValidationPassed)) == 1


async def test_a_version_announced_again_with_another_model_is_dead_lettered(gate: Gate) -> None:
    first = gate.train(churn_spec(), 1, churn_frame())
    await gate.register(first)
    other = gate.train(churn_spec(), 1, churn_frame(seed=3))
    assert other.artifact.key != first.artifact.key
    await gate.register(other)  # the same number for another model: a registry restored from a backup
    assert len(gate.bus.events(of=ValidationPassed)) == 1
    held = await gate.versions.get("churn", 1)
    assert held is not None and held.artifact == first.artifact
    [dead] = gate.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"churn version 1 is known with artifact {first.artifact.key}" in dead.error
    assert f"names artifact {other.artifact.key}" in dead.error


async def test_candidate_whose_artifact_is_missing_fails_with_a_named_check(gate: Gate) -> None:
    registered = gate.train(churn_spec(), 1, churn_frame())
    broken = registered.model_copy(
        update={"artifact": registered.artifact.model_copy(update={"key": "0" * 64})}
    )
    await gate.register(broken)
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["candidate-loads"]
    assert "cannot be loaded" in failed.data.checks[0].detail


def damaged(data: bytes) -> bytes:
    """A skops file with one value of its schema made unreadable; its types are unchanged, so the
    trusted-type check passes and only loading finds the damage."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            raw = src.read(info)
            if info.filename == "schema.json":
                raw = raw.replace(b'"content": "1.0"', b'"content": "not json"', 1)
                assert b"not json" in raw
            dst.writestr(info, raw)
    return out.getvalue()


def with_damaged_artifact(gate: Gate, registered: ModelVersionRegistered) -> ModelVersionRegistered:
    stored = gate.store.put(damaged(gate.store.get(registered.artifact.key)))
    artifact = registered.artifact.model_copy(update={"key": stored.sha256, "size_bytes": stored.size})
    return registered.model_copy(update={"artifact": artifact})


async def test_a_damaged_candidate_fails_the_candidate_loads_check(gate: Gate) -> None:
    await gate.register(with_damaged_artifact(gate, gate.train(churn_spec(), 1, churn_frame())))
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["candidate-loads"]
    assert "cannot be loaded" in failed.data.checks[0].detail


def champion_artifact(gate: Gate, registered: ModelVersionRegistered, problem: str) -> ModelVersionRegistered:
    """``registered`` with its artifact made ``problem``: missing, corrupted (bytes changed after storing),
    untrusted (a pickle) or unloadable (a damaged skops file)."""
    if problem == "unloadable":
        return with_damaged_artifact(gate, registered)
    if problem == "missing":
        key = "0" * 64
    elif problem == "untrusted":
        key = gate.store.put(pickle.dumps({"not": "a skops file"})).sha256
    else:
        key = registered.artifact.key
        path = Path(gate.store.root) / "sha256" / key[:2] / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return registered.model_copy(update={"artifact": registered.artifact.model_copy(update={"key": key})})


def unloadable_champions(reason: str) -> float:
    labels = {"model": "churn", "reason": reason}
    return REGISTRY.get_sample_value("driftloop_validation_champions_unloadable_total", labels) or 0.0


@pytest.mark.parametrize("problem", ["missing", "corrupted", "untrusted", "unloadable"])
async def test_a_champion_that_cannot_load_leaves_the_candidate_judged_on_its_absolute_checks(
    gate: Gate, problem: str
) -> None:
    # It failed every candidate with champion-loads until a person demoted the champion: the loop stalled.
    champion = champion_artifact(gate, gate.train(churn_spec(), 1, churn_frame()), problem)
    await gate.versions.record(champion)
    await gate.promote("churn", 1)
    counted = unloadable_champions(problem)
    with capture_logs() as logs:
        await gate.register(gate.train(churn_spec(), 2, churn_frame(1500, seed=1)))
    assert gate.bus.dead_letters == []
    [passed] = gate.bus.events(of=ValidationPassed)
    assert passed.data.champion_version == 1
    checks = {c.name: c for c in passed.data.checks}
    assert "champion-loads" not in checks
    comparison = checks["challenger-vs-champion:roc_auc"]
    assert comparison.passed and comparison.value is None and comparison.threshold is None
    assert comparison.detail.startswith(
        f"reported, not judged: champion v1 cannot be loaded ({problem}): the champion model "
        f"{champion.artifact.key[:12]} cannot be loaded: "
    )
    assert "judged on its absolute checks alone" in comparison.detail
    assert checks["signature-compatible"].passed  # its signature is its registration's: still checked
    assert unloadable_champions(problem) == counted + 1
    [error] = [line for line in logs if line["log_level"] == "error"]
    assert error["champion"] == 1 and error["champion_artifact"] == champion.artifact.key
    assert error["reason"] == problem
    assert ("possibly tampered" in error["event"]) is (problem == "untrusted")


async def test_a_candidate_with_an_unloadable_champion_still_fails_its_absolute_checks(gate: Gate) -> None:
    champion = with_damaged_artifact(gate, gate.train(churn_spec(), 1, churn_frame()))
    await gate.versions.record(champion)
    await gate.promote("churn", 1)
    worse = churn_frame(1500, seed=1)
    worse["churned"] = np.random.default_rng(3).integers(0, 2, len(worse))  # labels that are noise
    await gate.register(gate.train(churn_spec(), 2, worse))
    [failed] = gate.bus.events(of=ValidationFailed)
    assert "roc_auc>=0.75" in failed.data.failed_checks
    assert not any(name.startswith("challenger-vs-champion") for name in failed.data.failed_checks)


async def test_a_candidate_whose_spec_gates_another_task_fails_the_spec_readable_check(gate: Gate) -> None:
    # The lineage names a regression model's spec for a classifier: its slices were judged on rmse, which
    # scoring a classifier raised KeyError for, and the registration was dead-lettered (handler-failed)
    # instead of the candidate failing with a named check.
    registered = gate.train(churn_spec(), 1, churn_frame())
    data = churn_spec_data(task="regression", estimator="linear_regression", params={})
    data["validation"] = {
        "thresholds": {"rmse": 1.0},
        "slices": {"feature": "plan", "metric": "mae", "min_value": 1.0},
    }
    other = gate.store.put(spec_from_data(data).canonical_json())
    spec_ref = ArtifactRef(key=other.sha256, uri=other.uri, format=ArtifactFormat.JSON, size_bytes=other.size)
    await gate.register(
        registered.model_copy(update={"lineage": registered.lineage.model_copy(update={"spec": spec_ref})})
    )
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["spec-readable"]
    assert failed.data.checks[0].detail == (
        f"the model spec {other.sha256[:12]} cannot be used: it gates on rmse (validation.thresholds.rmse) "
        "and mae (validation.slices.metric), metrics of regression, but the candidate is a classification "
        "model: its lineage names the spec of another model"
    )


async def test_candidate_without_a_holdout_fails(gate: Gate) -> None:
    registered = gate.train(churn_spec(), 1, churn_frame())
    no_holdout = registered.model_copy(
        update={"lineage": registered.lineage.model_copy(update={"holdout": None})}
    )
    await gate.register(no_holdout)
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-available"]


async def test_a_champion_that_cannot_score_the_holdout_is_the_champions_failure(tmp_path: Path) -> None:
    # The champion took x1 as a category; the candidate takes it as a number. On the candidate's holdout
    # the champion raises TypeError (numpy's isnan on text), which was blamed on the candidate: the whole
    # report became one failed candidate-scores check.
    store = ArtifactStore(str(tmp_path))
    frame = churn_frame(400)
    spec = spec_from_data(churn_spec_data(params={}))
    candidate = build_pipeline(spec).fit(frame.drop(columns=["churned"]), frame["churned"])
    data = churn_spec_data(params={})
    data["features"][1] = {"name": "x1", "type": "categorical"}
    old_spec = spec_from_data(data)
    old_frame = frame.assign(x1=(frame["x1"] > 0).map({True: "hi", False: "lo"}))
    champion = build_pipeline(old_spec).fit(old_frame.drop(columns=["churned"]), old_frame["churned"])

    def ref(model: Any) -> ArtifactRef:
        stored = save_model(store, model)
        return ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.SKOPS, size_bytes=stored.size
        )

    evaluation = Evaluation(
        candidate=ref(candidate),
        signature=signature(spec, candidate, tuple(candidate.classes_)),
        holdout=put_frame(store, churn_frame(200, seed=1)),
        spec=spec.validation,
        seed=0,
        champion=ref(champion),
        champion_signature=signature(old_spec, champion, tuple(champion.classes_)),
    )
    measured = await StoreEvaluator(store, latency_repeats=1).measure(evaluation)
    assert measured.champion is None
    assert measured.champion_error is not None and measured.champion_error.startswith("TypeError: ")


async def test_a_report_with_thousands_of_slices_is_announced_within_the_event_limit(gate: Gate) -> None:
    # Slices by store, thousands of them: one check per level, about 220 bytes each, made a ValidationPassed
    # larger than consumers accept. The bus refused it, the registration was dead-lettered as
    # output-oversized and the candidate was never gated.
    frame = churn_frame(50_000)
    stores = np.random.default_rng(3).integers(0, 8_000, len(frame))
    frame["store"] = [f"store-{i:05d}-springfield" for i in stores]
    data = churn_spec_data(params={})
    data["features"].append({"name": "store", "type": "categorical"})
    data["validation"]["slices"] = {"feature": "store", "min_value": 0.6, "min_rows": 30}
    await gate.register(gate.train(spec_from_data(data), 1, frame))

    assert gate.bus.dead_letters == []
    [passed] = gate.bus.events(of=ValidationPassed)
    report = await report_for_version("churn", 1, reports=gate.reports)
    slices = [c for c in report.checks if c.kind is CheckKind.SLICE]
    assert len(slices) > 4_000  # the stored report has every check
    assert passed.data.checks_truncated
    assert passed.data.checks_total == len(report.checks) and passed.data.failed_checks_total == 0
    shown = [c for c in passed.data.checks if c.kind is CheckKind.SLICE]
    assert 0 < len(shown) < len(slices)
    assert [c for c in passed.data.checks if c.kind is not CheckKind.SLICE] == [
        c for c in report.checks if c.kind is not CheckKind.SLICE
    ]
    assert report.event_id == passed.id


class MeasuredEvaluator:
    """An evaluator that scores nothing: every candidate gets the same spec and the same measurements."""

    def __init__(self, spec: ValidationSpec, measured: Measured) -> None:
        self.spec, self.measured = spec, measured

    async def validation_spec(self, spec: ArtifactRef) -> ValidationSpec:
        return self.spec

    async def measure(self, evaluation: Evaluation) -> Measured:
        return self.measured


# roc_auc misses its threshold; the other nine checks pass. Announced whole, the event takes about 2,850 bytes
# (the registration it answers, about 2,150).
FOUR_THRESHOLDS = ValidationSpec(thresholds={"accuracy": 0.8, "f1": 0.7, "roc_auc": 0.75, "log_loss": 0.5})
ROC_AUC_MISSES = Measured(
    rows=10_000,
    metrics={"accuracy": 0.84, "f1": 0.72, "roc_auc": 0.70, "log_loss": 0.4},
    nonfinite_outputs=0,
    distinct_outputs=900,
    latency_ms_per_row=0.01,
    unlabelled_rows=3,
    unusable_labels=("'x'",),
    unknown_labels={"maybe": 4},
)
LIMIT = 2_500


def registered() -> ModelVersionRegistered:
    example = EXAMPLES[ModelVersionRegistered]
    assert isinstance(example, ModelVersionRegistered)
    return example


@pytest.mark.parametrize("metrics", [ROC_AUC_MISSES.metrics, {**ROC_AUC_MISSES.metrics, "roc_auc": 0.9}])
async def test_a_report_whose_checks_that_are_no_slice_pass_the_event_limit_is_announced_cut(
    tmp_path: Path, metrics: dict[str, float]
) -> None:
    # No slice to leave out: the cut left every other check in, the event stayed over the limit, the bus
    # refused it and the registration was dead-lettered as output-oversized: the candidate was never gated.
    measured = replace(ROC_AUC_MISSES, metrics=metrics)
    gate = Gate(tmp_path, max_event_bytes=LIMIT, evaluator=MeasuredEvaluator(FOUR_THRESHOLDS, measured))
    await gate.register(registered())

    assert gate.bus.dead_letters == []
    report = await report_for_version("churn", 7, reports=gate.reports)
    assert len(report.checks) == 10 and all(c.kind is not CheckKind.SLICE for c in report.checks)
    [announced] = gate.bus.events(of=ValidationPassed) + gate.bus.events(of=ValidationFailed)
    outcome = announced.data
    assert isinstance(outcome, ValidationFailed) == (not report.passed) == (metrics["roc_auc"] < 0.75)
    assert outcome.checks_truncated and 0 < len(outcome.checks) < len(report.checks)
    assert (outcome.checks_total, outcome.failed_checks_total) == (10, len(report.failed_checks))
    assert outcome.failed_checks == report.failed_checks
    assert [c for c in report.checks if not c.passed] == [c for c in outcome.checks if not c.passed]
    assert report.event_id == announced.id


def too_large_to_announce(measured: Measured) -> MeasuredEvaluator:
    """An evaluator whose report fails one slice only, whose level is 3,000 characters long: no event within
    :data:`LIMIT` can announce it."""
    spec = FOUR_THRESHOLDS.model_copy(update={"slices": SliceRule(feature="plan", min_value=0.6)})
    return MeasuredEvaluator(
        spec,
        replace(
            measured,
            metrics={**ROC_AUC_MISSES.metrics, "roc_auc": 0.9},
            slice_feature="plan",
            slice_metric="roc_auc",
            slices=[SliceMeasure(level="p" * 3_000, rows=100, value=0.5)],
        ),
    )


async def test_a_report_too_large_to_announce_even_cut_dead_letters_the_registration_saying_so(
    tmp_path: Path,
) -> None:
    # The one failed check is a slice whose level is 3,000 characters long: named in the check and in
    # failed_checks, it passes the limit alone, and a failed validation cannot be announced without it.
    gate = Gate(tmp_path, max_event_bytes=LIMIT, evaluator=too_large_to_announce(ROC_AUC_MISSES))
    await gate.register(registered())

    [dead] = gate.bus.dead_letters
    assert dead.reason == "output-oversized"
    assert "ValidationFailed of churn version 7 (report vr-churn-v7) would be " in dead.error
    assert "1 of its 11 checks (slice:plan=ppp" in dead.error and f"the limit of {LIMIT} bytes" in dead.error
    assert len(dead.error) < 1_000
    assert gate.bus.events(of=ValidationFailed) == [] and gate.reports.rows == {}


async def test_a_report_failing_thousands_of_slices_names_every_failed_one_in_its_cut_event(
    tmp_path: Path,
) -> None:
    # Before, the event named only the failed slices it carried (about 4,000 of them here).
    spec = FOUR_THRESHOLDS.model_copy(update={"slices": SliceRule(feature="store", min_value=0.6)})
    measured = replace(
        ROC_AUC_MISSES,
        slice_feature="store",
        slice_metric="roc_auc",
        slices=[SliceMeasure(level=f"s-{i:05d}", rows=100, value=0.5) for i in range(8_000)],
    )
    gate = Gate(tmp_path, evaluator=MeasuredEvaluator(spec, measured))
    await gate.register(registered())

    assert gate.bus.dead_letters == []
    report = await report_for_version("churn", 7, reports=gate.reports)
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.checks_truncated and failed.data.failed_checks_total == 8_001
    assert failed.data.failed_checks == report.failed_checks
    shown = failed.data.checks
    assert all(not c.passed for c in shown) and 0 < len(shown) < 8_001
    assert shown[0].name == "roc_auc>=0.75"


async def test_a_report_of_more_slice_levels_than_checked_says_so_in_its_cut_event(tmp_path: Path) -> None:
    # The check summing up the levels left out was the first an event too large left out (a passed slice
    # only reported, the last in report order): the event never said that levels went unchecked.
    spec = FOUR_THRESHOLDS.model_copy(update={"slices": SliceRule(feature="store", min_value=0.6)})
    measured = replace(
        ROC_AUC_MISSES,
        slice_feature="store",
        slice_metric="roc_auc",
        slices=[SliceMeasure(level=f"s-{i:05d}", rows=100, value=0.9) for i in range(8_000)],
        slices_left_out=SlicesLeftOut(levels=30_000, rows=60_000, max_slice_levels=8_000),
    )
    gate = Gate(tmp_path, evaluator=MeasuredEvaluator(spec, measured))
    await gate.register(registered())

    assert gate.bus.dead_letters == []
    report = await report_for_version("churn", 7, reports=gate.reports)
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.checks_truncated and failed.data.checks_total == len(report.checks) == 8_011
    summary = next(c for c in report.checks if c.name == "slice:store:other-levels:roc_auc")
    assert summary in failed.data.checks and "30,000 levels of store" in summary.detail
    assert bytes_over_limit(failed, max_bytes=1_000_000) == 0


async def change_stage(
    gate: Gate, version: int, from_stage: Stage, to_stage: Stage, sequence: int | None
) -> CloudEvent[ModelStageChanged]:
    event = stage_change(version, from_stage, to_stage, sequence)
    await gate.bus.publish(event)
    await gate.bus.drain()
    return event


async def test_an_old_stage_change_re_sent_under_a_new_id_does_not_bring_the_old_champion_back(
    gate: Gate,
) -> None:
    v2 = await change_stage(gate, 2, Stage.CANARY, Stage.PRODUCTION, 2)
    await change_stage(gate, 2, Stage.PRODUCTION, Stage.ARCHIVED, 4)
    await change_stage(gate, 3, Stage.CANARY, Stage.PRODUCTION, 5)
    assert await gate.champions.get("churn") == 3
    again = new_event(v2.data, source="/driftloop/registry")
    await gate.bus.publish(again)
    await gate.bus.drain()
    assert await gate.champions.get("churn") == 3
    [dead] = gate.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"{again.id} is stage change 2 of churn" in dead.error and "but stage change 5" in dead.error


async def test_stage_changes_repeated_or_unnumbered_before_numbering_keep_the_old_behaviour(
    gate: Gate,
) -> None:
    await change_stage(gate, 1, Stage.CANARY, Stage.PRODUCTION, None)
    assert await gate.champions.get("churn") == 1
    last = await change_stage(gate, 2, Stage.CANARY, Stage.PRODUCTION, 3)
    await gate.bus.publish(new_event(last.data, source="/driftloop/registry"))
    await gate.bus.drain()
    assert await gate.champions.get("churn") == 2 and gate.bus.dead_letters == []
    await change_stage(gate, 1, Stage.ARCHIVED, Stage.PRODUCTION, None)
    assert await gate.champions.get("churn") == 2
    [dead] = gate.bus.dead_letters
    assert "unnumbered stage change" in dead.error


@pytest.mark.parametrize("first", ["classification", "regression"])
async def test_a_candidate_of_another_task_than_its_champion_fails_the_comparison_saying_so(
    gate: Gate, first: str
) -> None:
    # The model's spec was put again with the other task. A regressor compared with a classifier champion on
    # rmse raised KeyError (rmse does not apply to classification) in validation's own measuring: retried,
    # then dead-lettered as handler-failed, the candidate never judged. The other way round, the detail
    # blamed the champion's classes ([]) rather than its task.
    classifier = churn_spec_data(params={})
    regressor = churn_spec_data(task="regression", estimator="linear_regression", params={})
    regressor["validation"] = {"thresholds": {"rmse": 1.0}, "champion": {"resamples": 50}}
    specs = [spec_from_data(classifier), spec_from_data(regressor)]
    if first == "regression":
        specs.reverse()
    await gate.register(gate.train(specs[0], 1, churn_frame()))
    await gate.promote("churn", 1)
    await gate.register(gate.train(specs[1], 2, churn_frame(seed=1)))
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.model_version == 2
    assert failed.data.failed_checks == [c.name for c in failed.data.checks if not c.passed]
    checks = {c.name: c for c in failed.data.checks}
    metric = "rmse" if first == "classification" else "roc_auc"
    other = "regression" if first == "classification" else "classification"
    assert checks[f"challenger-vs-champion:{metric}"].detail == (
        f"champion v1 could not be scored on the holdout: the champion is a {first} model and the candidate "
        f"a {other} one: no metric measures both"
    )
    assert not checks["signature-compatible"].passed
    assert f"task changed {first} -> {other}" in checks["signature-compatible"].detail


async def test_a_multiclass_candidate_whose_spec_gates_on_roc_auc_fails_the_spec_readable_check(
    gate: Gate,
) -> None:
    # roc_auc is a metric of two classes. Its threshold failed saying "roc_auc is undefined on this holdout",
    # and every slice on it passed as "reported, not judged" (one class?): the slices never gated anything,
    # and the report blamed the holdout for what the spec asks.
    frame = churn_frame()
    frame["churned"] = np.where(frame["x2"] > 0.8, 2, frame["churned"])
    data = churn_spec_data(params={})
    data["validation"]["slices"]["metric"] = "roc_auc"
    registered = gate.train(spec_from_data(data), 1, frame)
    assert registered.signature.classes == [0, 1, 2]
    await gate.register(registered)
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["spec-readable"]
    assert registered.lineage.spec is not None
    assert failed.data.checks[0].detail == (
        f"the model spec {registered.lineage.spec.key[:12]} cannot be used: it gates on roc_auc "
        "(validation.thresholds.roc_auc) and roc_auc (validation.slices.metric), metrics of two classes, but "
        "the candidate has 3 classes (0, 1, 2): gate on accuracy, f1 or log_loss"
    )


def candidate_failing(gate: Gate, registered: ModelVersionRegistered, check: str) -> ModelVersionRegistered:
    """``registered`` made to fail ``check``: its artifact missing (candidate-loads), its holdout no parquet
    file (holdout-readable)."""
    if check == "candidate-loads":
        return registered.model_copy(
            update={"artifact": registered.artifact.model_copy(update={"key": "0" * 64})}
        )
    assert registered.lineage.holdout is not None
    holdout = registered.lineage.holdout.model_copy(update={"sha256": gate.store.put(b"not a table").sha256})
    return registered.model_copy(
        update={"lineage": registered.lineage.model_copy(update={"holdout": holdout})}
    )


@pytest.mark.parametrize("check", ["candidate-loads", "holdout-readable"])
async def test_a_champion_that_cannot_load_is_said_when_the_candidate_fails_a_check_of_its_own(
    gate: Gate, check: str
) -> None:
    # A candidate that could not load was failed before the champion was tried, and one whose holdout could
    # not be read dropped what was found of the champion: no error, no count, and an operator alerting on the
    # counter saw nothing while production's artifact was damaged.
    champion = champion_artifact(gate, gate.train(churn_spec(), 1, churn_frame()), "corrupted")
    await gate.versions.record(champion)
    await gate.promote("churn", 1)
    counted = unloadable_champions("corrupted")
    with capture_logs() as logs:
        await gate.register(candidate_failing(gate, gate.train(churn_spec(), 2, churn_frame(seed=1)), check))
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == [check] and failed.data.champion_version == 1
    assert unloadable_champions("corrupted") == counted + 1
    [error] = [line for line in logs if line["log_level"] == "error"]
    assert (error["candidate"], error["champion"]) == (2, 1)
    assert error["champion_artifact"] == champion.artifact.key and error["reason"] == "corrupted"


class ReportsFailingOnce(FakeReports):
    """Reports whose first save fails as a database connection lost mid-transaction does."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def save(self, report: Report) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection lost")
        await super().save(report)


UNLOADABLE = replace(
    ROC_AUC_MISSES,
    champion_unloadable=ChampionUnloadable(reason="missing", detail="the champion model 0000 is gone"),
)


async def with_champion(gate: Gate) -> ModelVersionRegistered:
    """The example registration (churn v7), its champion v6 promoted."""
    candidate = registered()
    await gate.versions.record(candidate.model_copy(update={"model_version": 6}))
    await gate.promote(candidate.model, 6)
    return candidate


async def test_an_unloadable_champion_is_counted_once_for_a_candidate_judged_on_a_second_run(
    tmp_path: Path,
) -> None:
    # The bus runs the handler again when its transaction fails (here the report's save): counted as it ran,
    # the champion was counted once per run, not once per judged candidate.
    gate = Gate(tmp_path, evaluator=MeasuredEvaluator(FOUR_THRESHOLDS, UNLOADABLE))
    gate.reports = ReportsFailingOnce()
    candidate = await with_champion(gate)
    counted = unloadable_champions("missing")
    with capture_logs() as logs:
        await gate.register(candidate)
    assert gate.bus.dead_letters == [] and isinstance(gate.reports, ReportsFailingOnce)
    assert gate.reports.failures == 0  # the handler did run twice
    assert len(gate.bus.events(of=ValidationFailed)) == 1
    assert unloadable_champions("missing") == counted + 1
    assert len([line for line in logs if line["log_level"] == "error"]) == 1


async def test_an_unloadable_champion_is_not_counted_for_a_candidate_whose_report_is_dead_lettered(
    tmp_path: Path,
) -> None:
    # Too large to announce, the registration is dead-lettered and the candidate not judged; replayed once the
    # limit is raised, it is judged and counted then.
    gate = Gate(tmp_path, max_event_bytes=LIMIT, evaluator=too_large_to_announce(UNLOADABLE))
    candidate = await with_champion(gate)
    counted = unloadable_champions("missing")
    await gate.register(candidate)
    [dead] = gate.bus.dead_letters
    assert dead.reason == "output-oversized"
    assert unloadable_champions("missing") == counted
