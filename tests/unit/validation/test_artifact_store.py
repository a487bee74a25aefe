"""One rule for every artifact validation reads (the spec, the candidate, the holdout): the store failing for
a moment is tried again in place, a bounded number of times; an artifact that is corrupted fails its check at
once; a store that keeps failing judges nothing: the bus retries the event until the store is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from contracts.models import ModelVersionRegistered
from contracts.validation import ValidationFailed, ValidationPassed
from libs.artifacts import ArtifactStore
from services.validation.adapters.evaluator import StoreEvaluator
from tests.unit.store_fakes import FlakyStore
from tests.unit.training.data import churn_frame, churn_spec
from tests.unit.validation.test_handlers import Gate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATTEMPTS = 3


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    # As validation's bootstrap builds it, without the waits between tries.
    return Gate(
        tmp_path, evaluator=StoreEvaluator(ArtifactStore(str(tmp_path), attempts=ATTEMPTS, backoff_s=0))
    )


def key_of(registered: ModelVersionRegistered, artifact: str) -> str:
    if artifact == "candidate":
        return registered.artifact.key
    if artifact == "holdout":
        assert registered.lineage.holdout is not None
        return registered.lineage.holdout.sha256
    assert registered.lineage.spec is not None
    return registered.lineage.spec.key


def corrupt(gate: Gate, key: str) -> None:
    path = Path(gate.store.root) / "sha256" / key[:2] / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


async def validated(
    gate: Gate, artifact: str, *, failing_reads: int = 0, corrupted: bool = False, flaky: FlakyStore
) -> str:
    """Validate a trained version whose ``artifact`` the store fails to read ``failing_reads`` times, or
    whose file is corrupted; returns the artifact's key."""
    registered = gate.train(churn_spec(), 1, churn_frame())
    key = key_of(registered, artifact)
    flaky.reads.clear()  # training read the spec too
    flaky.failing_reads[key] = failing_reads
    if corrupted:
        corrupt(gate, key)
    await gate.register(registered)
    return key


CHECKS = {"candidate": "candidate-loads", "holdout": "holdout-readable", "spec": "spec-readable"}


@pytest.mark.parametrize("artifact", ["candidate", "holdout", "spec"])
async def test_a_store_that_fails_for_a_moment_is_read_again_and_the_candidate_judged(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, artifact: str
) -> None:
    flaky = FlakyStore(monkeypatch)
    key = await validated(gate, artifact, failing_reads=ATTEMPTS - 1, flaky=flaky)
    assert gate.bus.dead_letters == []
    assert [e.data.model_version for e in gate.bus.events(of=ValidationPassed)] == [1]
    assert flaky.reads[key] == ATTEMPTS


@pytest.mark.parametrize("artifact", ["candidate", "holdout", "spec"])
async def test_a_store_that_keeps_failing_judges_nothing_and_the_bus_retries_until_it_is_back(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, artifact: str
) -> None:
    # Past the store's own tries, StoreUnavailable (an OSError) goes to the bus, which retries the event
    # without limit as for any outage: a candidate is judged once, for good, and an outage must not judge it.
    flaky = FlakyStore(monkeypatch)
    key = await validated(gate, artifact, failing_reads=2 * ATTEMPTS, flaky=flaky)
    assert gate.bus.dead_letters == []
    assert gate.bus.events(of=ValidationFailed) == []
    assert [e.data.model_version for e in gate.bus.events(of=ValidationPassed)] == [1]
    assert flaky.reads[key] == 2 * ATTEMPTS + 1


@pytest.mark.parametrize("artifact", ["candidate", "holdout", "spec"])
async def test_a_corrupted_artifact_fails_its_check_at_once(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, artifact: str
) -> None:
    flaky = FlakyStore(monkeypatch)
    key = await validated(gate, artifact, corrupted=True, flaky=flaky)
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == [CHECKS[artifact]]
    assert f"artifact {key} is corrupted" in failed.data.checks[0].detail
    assert flaky.reads[key] == 1


async def test_a_holdout_whose_bytes_are_no_table_fails_naming_the_format(gate: Gate) -> None:
    registered = gate.train(churn_spec(), 1, churn_frame())
    assert registered.lineage.holdout is not None
    junk = gate.store.put(b"PAR1 these bytes are no Parquet file PAR1")
    holdout = registered.lineage.holdout.model_copy(update={"sha256": junk.sha256})
    await gate.register(
        registered.model_copy(update={"lineage": registered.lineage.model_copy(update={"holdout": holdout})})
    )
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-readable"]
    assert f"the holdout {junk.sha256[:12]} is not a readable parquet file" in failed.data.checks[0].detail


async def test_a_store_that_keeps_failing_on_the_champion_judges_nothing_and_the_bus_retries(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A champion that cannot load leaves the candidate judged without the comparison; a store that cannot
    # read the champion is an outage, which must not: the candidate is judged against it once it is back.
    flaky = FlakyStore(monkeypatch)
    champion = gate.train(churn_spec(), 1, churn_frame())
    await gate.versions.record(champion)
    await gate.promote("churn", 1)
    candidate = gate.train(churn_spec(), 2, churn_frame(1500, seed=1))
    flaky.reads.clear()
    flaky.failing_reads[champion.artifact.key] = 2 * ATTEMPTS
    await gate.register(candidate)
    assert gate.bus.dead_letters == []
    [passed] = gate.bus.events(of=ValidationPassed)
    comparison = next(c for c in passed.data.checks if c.name == "challenger-vs-champion:roc_auc")
    assert comparison.interval is not None and comparison.passed
    assert flaky.reads[champion.artifact.key] == 2 * ATTEMPTS + 1


@pytest.mark.parametrize("artifact", ["champion", "candidate", "holdout"])
async def test_running_out_of_memory_reading_an_artifact_judges_nothing(
    gate: Gate, monkeypatch: pytest.MonkeyPatch, artifact: str
) -> None:
    # A MemoryError is the machine's as much as the artifact's (docs/validation.md): it goes to the bus, which
    # retries, then dead-letters the registration. Read as the artifact's fault, it failed holdout-readable or
    # candidate-loads for good, and a champion's was taken for an unloadable champion: the comparison skipped,
    # the candidate judged on its absolute checks alone and the champion counted as needing replacement.
    import pandas as pd
    import skops.io

    champion = gate.train(churn_spec(), 1, churn_frame())
    await gate.versions.record(champion)
    await gate.promote("churn", 1)
    candidate = gate.train(churn_spec(), 2, churn_frame(1500, seed=1))
    model_bytes = (gate.store.get(champion.artifact.key), gate.store.get(candidate.artifact.key))
    failing = {"champion": model_bytes[0], "candidate": model_bytes[1]}.get(artifact)
    load = skops.io.load

    def load_short_of_memory(file: Any, *args: Any, **kwargs: Any) -> Any:
        if file.getvalue() == failing:
            raise MemoryError()
        return load(file, *args, **kwargs)

    def read_short_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError()

    monkeypatch.setattr(skops.io, "load", load_short_of_memory)
    if artifact == "holdout":
        monkeypatch.setattr(pd, "read_parquet", read_short_of_memory)
    await gate.register(candidate)
    assert gate.bus.events(of=ValidationFailed) == []
    assert gate.bus.events(of=ValidationPassed) == []
    [dead] = gate.bus.dead_letters
    assert dead.reason == "handler-failed"
    assert "MemoryError" in dead.error
    monkeypatch.undo()  # the machine has memory again: the dead letter replayed judges the candidate
    await gate.register(candidate)
    [passed] = gate.bus.events(of=ValidationPassed)
    comparison = next(c for c in passed.data.checks if c.name == "challenger-vs-champion:roc_auc")
    assert comparison.interval is not None
