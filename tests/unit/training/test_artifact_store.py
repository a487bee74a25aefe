"""A run's reads and writes of the artifact store follow validation's rule: the store failing for a moment
is tried again in place, a bounded number of times; a missing or corrupted file fails the run at once with
the dataset's reason; a store that keeps failing is an outage, not the dataset's fault nor the run's: the
runner waits for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from contracts.training import FailureReason
from libs.artifacts import ArtifactStore
from services.training.worker import run_training
from tests.unit.store_fakes import FlakyStore
from tests.unit.training.data import churn_frame, churn_spec, put_frame

ATTEMPTS = 3


def job(tmp_path: Path) -> tuple[dict[str, Any], str]:
    store = ArtifactStore(str(tmp_path))
    base = put_frame(store, churn_frame(600, seed=1)).key
    spec = churn_spec()
    return {
        "job_id": "job-store",
        "model": spec.name,
        "spec_key": store.put(spec.canonical_json()).sha256,
        "datasets": [{"name": "churn-base", "version": 1, "sha256": base}],
        "artifacts_url": str(tmp_path),
        "store_attempts": ATTEMPTS,
        "store_retry_backoff_s": 0,
    }, base


def test_a_dataset_the_store_fails_to_give_for_a_moment_is_read_again_and_the_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, base = job(tmp_path)
    flaky = FlakyStore(monkeypatch)
    flaky.failing_reads[base] = ATTEMPTS - 1
    outcome = run_training(raw)
    assert outcome["ok"], outcome
    assert flaky.reads[base] == ATTEMPTS


def test_writes_the_store_fails_for_a_moment_are_tried_again_and_the_run_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, _ = job(tmp_path)
    flaky = FlakyStore(monkeypatch)
    flaky.failing_writes = ATTEMPTS - 1
    outcome = run_training(raw)
    assert outcome["ok"], outcome
    assert ArtifactStore(str(tmp_path)).get(outcome["artifact"]["key"])


@pytest.mark.parametrize("what", ["base", "spec"])
def test_a_store_that_keeps_failing_is_an_outage_for_the_runner_not_a_failure_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    # Not artifact-store-error, which failed the job for good: the runner waits for the store and runs the
    # job again (tests/unit/training/test_store_outage.py).
    raw, base = job(tmp_path)
    key = base if what == "base" else raw["spec_key"]
    flaky = FlakyStore(monkeypatch)
    flaky.failing_reads[key] = ATTEMPTS
    outcome = run_training(raw)
    assert outcome["ok"] is False
    assert outcome["store_outage"] is True
    assert "reason" not in outcome
    assert f"the artifact store failed {ATTEMPTS} times in a row on reading {key}" in outcome["message"]
    assert "TimeoutError: read timed out" in outcome["message"]
    assert flaky.reads[key] == ATTEMPTS


def test_a_corrupted_dataset_fails_the_run_at_once_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, base = job(tmp_path)
    path = tmp_path / "sha256" / base[:2] / base
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    flaky = FlakyStore(monkeypatch)
    outcome = run_training(raw)
    assert outcome["reason"] == FailureReason.DATASET_UNAVAILABLE.value
    assert f"artifact {base} is corrupted" in outcome["message"]
    assert flaky.reads[base] == 1
