"""A candidate that errors on its holdout is a failed candidate: whatever its predict or predict_proba raises
(or returns that cannot be the outputs of the rows it was given) fails the candidate-scores check, naming the
exception, and the registration is not dead-lettered; an error of the infrastructure still goes to the bus,
which retries the event until it is judged."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from structlog.testing import capture_logs

from contracts.models import ModelVersionRegistered
from contracts.validation import ValidationFailed, ValidationPassed
from libs.artifacts import ArtifactStore
from libs.modelspec import FLOAT32_MAX, spec_from_data
from services.validation import scoring
from services.validation.adapters.evaluator import StoreEvaluator
from services.validation.scoring import CANDIDATE_ERROR_MAX_CHARS
from tests.unit.training.data import churn_frame, churn_spec, price_spec_data, put_frame, regression_frame
from tests.unit.validation.test_handlers import Gate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Hostile:
    """A fitted classifier whose scoring raises its evaluator's ``error`` (on the evaluator's first ``times``
    calls, or on every call), or, without an error, returns the probabilities of one row fewer than given."""

    def __init__(self, model: Any, evaluator: HostileEvaluator) -> None:
        self.model = model
        self.classes_ = model.classes_
        self.evaluator = evaluator

    def _scored(self, frame: Any, score: Any) -> Any:
        owner = self.evaluator
        if owner.error is None:
            return score(frame)[1:]
        if owner.times is None or owner.times > 0:
            if owner.times is not None:
                owner.times -= 1  # counted across the bus's retries, each of which loads the model again
            raise owner.error
        return score(frame)

    def predict(self, frame: Any) -> Any:
        return self._scored(frame, self.model.predict)

    def predict_proba(self, frame: Any) -> Any:
        return self._scored(frame, self.model.predict_proba)


class HostileEvaluator(StoreEvaluator):
    """Loads the candidate from the store as validation does, then hands over a hostile one in its place."""

    def __init__(
        self,
        gate_root: Path,
        error: BaseException | None,
        *,
        times: int | None = None,
        who: str = "candidate",
    ) -> None:
        super().__init__(ArtifactStore(str(gate_root)), latency_repeats=1)
        self.error, self.times, self.who = error, times, who

    def _model(self, ref: Any, who: str) -> object:
        model = super()._model(ref, who)
        return Hostile(model, self) if who == self.who else model


ERRORS = [
    IndexError("index 7 is out of bounds for axis 0 with size 2"),
    ValueError("Input X contains infinity"),
    KeyError("plan"),
    ZeroDivisionError("division by zero"),
    RuntimeError("x" * 50_000),
    np.linalg.LinAlgError("Singular matrix"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
async def test_a_candidate_raising_on_the_holdout_fails_candidate_scores_naming_the_error(
    tmp_path: Path, error: BaseException
) -> None:
    gate = Gate(tmp_path, evaluator=HostileEvaluator(tmp_path, error))
    await gate.register(gate.train(churn_spec(), 1, churn_frame()))
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["candidate-scores"]
    detail = failed.data.checks[0].detail
    assert detail.startswith(f"the candidate cannot score the holdout: {type(error).__name__}: ")
    assert str(error)[:100] in detail
    assert len(detail) <= CANDIDATE_ERROR_MAX_CHARS + 200


async def test_a_candidate_returning_outputs_for_other_rows_fails_candidate_scores(tmp_path: Path) -> None:
    gate = Gate(tmp_path, evaluator=HostileEvaluator(tmp_path, None))
    registered = gate.train(churn_spec(), 1, churn_frame())
    await gate.register(registered)
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["candidate-scores"]
    assert registered.lineage.holdout is not None and registered.lineage.holdout.rows is not None
    rows = registered.lineage.holdout.rows
    assert failed.data.checks[0].detail == (
        f"the candidate cannot score the holdout: its predict_proba returned shape ({rows - 1}, 2) "
        f"for {rows:,} rows and 2 classes"
    )


async def test_an_infrastructure_error_while_scoring_goes_to_the_bus_and_the_candidate_is_judged(
    tmp_path: Path,
) -> None:
    # An OSError (a joblib worker that cannot start, a file the model reads) is the machine's, not the
    # candidate's: the bus retries the event, and the candidate is judged once it goes through.
    evaluator = HostileEvaluator(tmp_path, ConnectionError("worker unreachable"), times=2)
    gate = Gate(tmp_path, evaluator=evaluator)
    await gate.register(gate.train(churn_spec(), 1, churn_frame()))
    assert gate.bus.dead_letters == []
    assert gate.bus.events(of=ValidationFailed) == []
    assert [e.data.model_version for e in gate.bus.events(of=ValidationPassed)] == [1]


async def test_an_infrastructure_error_while_scoring_the_champion_goes_to_the_bus_not_into_the_report(
    tmp_path: Path,
) -> None:
    # The champion's errors are the champion's (its check fails), but an outage is nobody's: it failed the
    # challenger-vs-champion check of the candidate for good.
    evaluator = HostileEvaluator(tmp_path, TimeoutError("scoring timed out"), times=2, who="champion")
    gate = Gate(tmp_path, evaluator=evaluator)
    await gate.register(gate.train(churn_spec(), 1, churn_frame()))
    await gate.promote("churn", 1)
    await gate.register(gate.train(churn_spec(), 2, churn_frame(1500, seed=1)))
    assert gate.bus.dead_letters == []
    assert gate.bus.events(of=ValidationFailed) == []
    passed = gate.bus.events(of=ValidationPassed)
    assert [e.data.model_version for e in passed] == [1, 2]
    assert passed[1].data.champion_version == 1
    assert evaluator.times == 0


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise AttributeError("'NoneType' object has no attribute 'shape'")


@pytest.mark.parametrize("where", ["all_metrics", "read_labels"])
async def test_a_bug_of_validations_own_measuring_is_not_the_candidates_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Only what the candidate's own calls raise judges it: an error of validation's code (here one of its
    # steps that never calls the candidate) failed candidate-scores for good, blaming a model that scores
    # its holdout fine. It goes to the bus instead: retried, then dead-lettered, the candidate not judged.
    gate = Gate(tmp_path, evaluator=StoreEvaluator(ArtifactStore(str(tmp_path)), latency_repeats=1))
    registered = gate.train(churn_spec(), 1, churn_frame())
    monkeypatch.setattr(scoring, where, _bug)
    await gate.register(registered)
    assert gate.bus.events(of=ValidationFailed) == []
    assert gate.bus.events(of=ValidationPassed) == []
    [dead] = gate.bus.dead_letters
    assert dead.reason == "handler-failed"
    assert "AttributeError" in dead.error


async def test_a_bug_comparing_with_the_champion_is_not_the_champions_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(tmp_path, evaluator=StoreEvaluator(ArtifactStore(str(tmp_path)), latency_repeats=1))
    await gate.register(gate.train(churn_spec(), 1, churn_frame()))
    await gate.promote("churn", 1)
    registered = gate.train(churn_spec(), 2, churn_frame(1500, seed=1))
    monkeypatch.setattr(scoring, "paired_bootstrap_difference", _bug)
    await gate.register(registered)
    assert [e.data.model_version for e in gate.bus.events(of=ValidationPassed)] == [1]
    assert gate.bus.events(of=ValidationFailed) == []
    [dead] = gate.bus.dead_letters
    assert dead.reason == "handler-failed"


async def register_with_holdout(
    gate: Gate, registered: ModelVersionRegistered, change: Callable[[pd.DataFrame], None]
) -> pd.DataFrame:
    """Register the version with its holdout as ``change`` makes it (in place); that holdout."""
    assert registered.lineage.holdout is not None
    holdout = pd.read_parquet(io.BytesIO(gate.store.get(registered.lineage.holdout.sha256)))
    change(holdout)
    key = put_frame(gate.store, holdout).key
    lineage = registered.lineage.model_copy(
        update={"holdout": registered.lineage.holdout.model_copy(update={"sha256": key})}
    )
    await gate.register(registered.model_copy(update={"lineage": lineage}))
    return holdout


async def test_text_in_a_holdouts_numeric_feature_fails_the_holdout_check_not_the_candidate(
    tmp_path: Path,
) -> None:
    # Every model fails on such a holdout: the candidate's predict raised and candidate-scores failed,
    # blaming the model for the holdout's values.
    gate = Gate(tmp_path)
    registered = gate.train(churn_spec(), 1, churn_frame())

    def change(holdout: pd.DataFrame) -> None:
        holdout["x1"] = holdout["x1"].map(str)
        holdout.loc[[2, 5], "x1"] = "abc"

    holdout = await register_with_holdout(gate, registered, change)
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-matches-signature"]
    assert failed.data.checks[0].detail == (
        f"the holdout's numeric feature 'x1' holds 2 value(s) that are no number (of {len(holdout):,} rows), "
        "such as 'abc'"
    )


@pytest.mark.parametrize("as_text", [False, True], ids=["numbers", "text"])
async def test_an_infinity_in_a_holdouts_numeric_feature_fails_the_holdout_check_not_the_candidate(
    tmp_path: Path, as_text: bool
) -> None:
    # No model takes an infinity (training refuses one in its rows, serving answers 422), yet a registered
    # dataset may hold one ("inf" written out) and a lineage may name it as the holdout: the candidate's
    # predict raised "Input X contains infinity" and candidate-scores failed, blaming the model.
    gate = Gate(tmp_path)
    registered = gate.train(churn_spec(), 1, churn_frame())

    def change(holdout: pd.DataFrame) -> None:
        if as_text:
            holdout["x1"] = holdout["x1"].map(str)
            holdout.loc[[2, 5, 9], "x1"] = ["inf", "-Infinity", "1e400"]
        else:
            holdout.loc[[2, 5, 9], "x1"] = [np.inf, -np.inf, np.inf]

    holdout = await register_with_holdout(gate, registered, change)
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-matches-signature"]
    assert failed.data.checks[0].detail == (
        f"the holdout's numeric feature 'x1' holds an infinity in 3 row(s) (of {len(holdout):,} rows): no "
        "model takes one; replace them by a finite value or leave them empty (missing values are imputed)"
    )


@pytest.mark.parametrize("as_text", [False, True], ids=["numbers", "text"])
async def test_a_value_beyond_float32s_range_in_a_holdouts_numeric_feature_fails_the_holdout_check(
    tmp_path: Path, as_text: bool
) -> None:
    # Serving answers 422 for such an input and training refuses it in its rows, yet the candidate was scored
    # on it (1e300 is finite) and judged on an input it can never be served.
    gate = Gate(tmp_path)
    registered = gate.train(churn_spec(), 1, churn_frame())

    def change(holdout: pd.DataFrame) -> None:
        if as_text:
            holdout["x1"] = holdout["x1"].map(str)
            holdout.loc[[2, 5], "x1"] = ["1e300", "-4e38"]
        else:
            holdout.loc[[2, 5], "x1"] = [1e300, -4e38]
        holdout.loc[7, "x1"] = FLOAT32_MAX if not as_text else repr(FLOAT32_MAX)  # the bound itself is served

    holdout = await register_with_holdout(gate, registered, change)
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-matches-signature"]
    assert failed.data.checks[0].detail == (
        "the holdout's numeric feature 'x1' holds a value beyond float32's range (magnitude at most "
        f"3.4028235e+38, where models compute) in 2 row(s) (of {len(holdout):,} rows), such as 1e+300: no "
        "model is given one (training refuses it, serving answers 422); replace them by a value within that "
        "range or leave them empty (missing values are imputed)"
    )


@pytest.mark.parametrize("kind", ["numbers", "booleans"])
async def test_numbers_in_a_holdouts_categorical_feature_of_text_levels_fail_the_holdout_check(
    tmp_path: Path, kind: str
) -> None:
    # The candidate learned plan as text ("basic", "plus", "premium"); a number or a boolean can be none of
    # its levels (serving answers 422 wrong-type), and scikit-learn's encoder raised on them (TypeError,
    # or "y contains previously unseen labels"): candidate-scores failed, blaming the model for the holdout
    # (another dataset than the training set's, say, where the plan is coded).
    gate = Gate(tmp_path)
    registered = gate.train(churn_spec(), 1, churn_frame())

    def change(holdout: pd.DataFrame) -> None:
        if kind == "numbers":
            holdout["plan"] = holdout["plan"].map({"basic": 1, "plus": 2, "premium": 3})
        else:
            holdout["plan"] = holdout["plan"] == "basic"

    holdout = await register_with_holdout(gate, registered, change)
    shown = ", ".join(map(str, list(dict.fromkeys(holdout["plan"].tolist()))[:3]))
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-matches-signature"]
    assert failed.data.checks[0].detail == (
        f"the holdout's categorical feature 'plan' holds {len(holdout):,} value(s) that are no text (of "
        f"{len(holdout):,} rows), such as {shown}: the candidate learned its levels as text ('basic', "
        "'plus', 'premium'), which a number or a boolean is none of; write them as text"
    )


async def test_a_holdouts_categorical_feature_of_text_levels_may_be_a_pandas_category_or_string_column(
    tmp_path: Path,
) -> None:
    gate = Gate(tmp_path)
    registered = gate.train(churn_spec(), 1, churn_frame())

    def change(holdout: pd.DataFrame) -> None:
        holdout["plan"] = holdout["plan"].astype("category")
        holdout["x2"] = holdout["x2"].astype("string")
        holdout.loc[[3], "plan"] = None

    await register_with_holdout(gate, registered, change)
    assert gate.bus.dead_letters == []
    assert [e.data.model_version for e in gate.bus.events(of=ValidationPassed)] == [1]


def trained_on_integer_plans(gate: Gate) -> ModelVersionRegistered:
    """Version 1 of churn, trained with plan as the integer codes 1, 2 and 3."""
    frame = churn_frame()
    frame["plan"] = frame["plan"].map({"basic": 1, "plus": 2, "premium": 3})
    return gate.train(churn_spec(), 1, frame)


async def test_text_in_a_holdouts_categorical_feature_of_integer_levels_fails_the_holdout_check(
    tmp_path: Path,
) -> None:
    # The candidate learned plan as integer codes; the holdout writes them as text ("1"), which scikit-learn's
    # encoder took for unseen levels: the candidate was scored as if it knew no plan at all, and its metrics
    # judged, with nothing said.
    gate = Gate(tmp_path)
    registered = trained_on_integer_plans(gate)

    def change(holdout: pd.DataFrame) -> None:
        holdout["plan"] = holdout["plan"].map(str)

    holdout = await register_with_holdout(gate, registered, change)
    shown = ", ".join(map(repr, list(dict.fromkeys(holdout["plan"].tolist()))[:3]))
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-matches-signature"]
    assert failed.data.checks[0].detail == (
        f"the holdout's categorical feature 'plan' holds {len(holdout):,} value(s) that are no integer (of "
        f"{len(holdout):,} rows), such as {shown}: the candidate learned its levels as integers (1, 2, 3), "
        "which text, a boolean, a fraction or an infinity is none of; write them as integers"
    )


async def test_a_holdouts_categorical_feature_of_integer_levels_may_have_gaps(tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    registered = trained_on_integer_plans(gate)

    def change(holdout: pd.DataFrame) -> None:
        holdout["plan"] = holdout["plan"].astype(float)  # a gap makes a CSV's integer column floats
        holdout.loc[[3, 4], "plan"] = np.nan

    await register_with_holdout(gate, registered, change)
    assert gate.bus.dead_letters == []
    assert [e.data.model_version for e in gate.bus.events(of=ValidationPassed)] == [1]


@pytest.mark.parametrize("infinity", [np.inf, -np.inf], ids=["inf", "-inf"])
async def test_an_infinity_in_a_holdouts_categorical_feature_of_integer_levels_fails_the_holdout_check(
    tmp_path: Path, infinity: float
) -> None:
    # A float column (integer codes with a gap, an uploaded CSV's `inf` kept) passed the check as whole
    # numbers, since inf == round(inf): the candidate's encoder then raised on it and candidate-scores failed,
    # blaming the model for the holdout.
    gate = Gate(tmp_path)
    registered = trained_on_integer_plans(gate)

    def change(holdout: pd.DataFrame) -> None:
        holdout["plan"] = holdout["plan"].astype(float)
        holdout.loc[3, "plan"] = np.nan
        holdout.loc[4, "plan"] = infinity

    holdout = await register_with_holdout(gate, registered, change)
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["holdout-matches-signature"]
    assert failed.data.checks[0].detail == (
        f"the holdout's categorical feature 'plan' holds 1 value(s) that are no integer (of {len(holdout):,} "
        f"rows), such as {infinity!r}: the candidate learned its levels as integers (1, 2, 3), which text, a "
        "boolean, a fraction or an infinity is none of; write them as integers"
    )


class Overflowing:
    """A fitted regressor whose predictions on its first ``rows`` rows are ``value`` (1e200: finite, yet its
    square overflows to infinity)."""

    def __init__(self, model: Any, value: float, rows: int) -> None:
        self.model, self.value, self.rows = model, value, rows

    def predict(self, frame: Any) -> Any:
        predictions = np.asarray(self.model.predict(frame), dtype=float).copy()
        predictions[: self.rows] = self.value
        return predictions


class OverflowingEvaluator(StoreEvaluator):
    """Loads the models from the store as validation does, then hands over an overflowing ``who`` model."""

    def __init__(self, gate_root: Path, value: float, *, who: str, rows: int = 3) -> None:
        super().__init__(ArtifactStore(str(gate_root)), latency_repeats=1)
        self.value, self.who, self.rows = value, who, rows

    def _model(self, ref: Any, who: str) -> object:
        model = super()._model(ref, who)
        return Overflowing(model, self.value, self.rows) if who == self.who else model


def price_spec(thresholds: dict[str, float]) -> Any:
    """A ridge regressor of price on x0..x2 (:func:`regression_frame`), gated on ``thresholds``."""
    champion = {"max_degradation": 0.5, "resamples": 100}
    return spec_from_data(price_spec_data(validation={"thresholds": thresholds, "champion": champion}))


def all_finite(checks: list[Any]) -> bool:
    """Every number a check carries is finite (JSON has no NaN nor infinity)."""
    numbers = [
        v
        for c in checks
        for v in (c.value, c.threshold, *((c.interval.low, c.interval.high) if c.interval else ()))
        if v is not None
    ]
    return all(np.isfinite(numbers))


OUT_OF_RANGE = [1e200, -1e300, 4e38, np.inf, np.nan]


@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=lambda v: f"{v:g}")
async def test_a_candidate_predicting_beyond_float32s_range_fails_finite_outputs_naming_one(
    tmp_path: Path, value: float
) -> None:
    # 1e200 is finite: sanity:finite-outputs passed it and rmse overflowed to infinity ("undefined on this
    # holdout"), so a first version with no threshold on rmse or r2 passed the gate, and serving would have
    # answered those predictions. No model is fitted or served beyond float32's range.
    gate = Gate(tmp_path, evaluator=OverflowingEvaluator(tmp_path, value, who="candidate"))
    await gate.register(gate.train(price_spec({}), 1, regression_frame(600)))
    assert gate.bus.dead_letters == []
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["sanity:finite-outputs"]
    checks = {c.name: c for c in failed.data.checks}
    finite = checks["sanity:finite-outputs"]
    assert finite.value == 3.0
    assert finite.detail.startswith(
        "3 NaN, infinite or out-of-range outputs (beyond float32's range: magnitude at most 3.4028235e+38) "
        "on "
    )
    assert finite.detail.endswith(f", such as {value:.6g}")
    assert all_finite(failed.data.checks)


async def test_a_candidate_predicting_beyond_float32s_range_says_why_its_metrics_are_undefined(
    tmp_path: Path,
) -> None:
    gate = Gate(tmp_path, evaluator=OverflowingEvaluator(tmp_path, 1e200, who="candidate"))
    await gate.register(gate.train(price_spec({"rmse": 5.0, "r2": 0.5}), 1, regression_frame(600)))
    [failed] = gate.bus.events(of=ValidationFailed)
    assert failed.data.failed_checks == ["r2>=0.5", "rmse<=5", "sanity:finite-outputs"]
    checks = {c.name: c for c in failed.data.checks}
    assert checks["rmse<=5"].detail.endswith(
        ": the candidate's outputs are not all usable numbers (see sanity:finite-outputs)"
    )
    assert all_finite(failed.data.checks)


@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=lambda v: f"{v:g}")
async def test_a_champion_predicting_beyond_float32s_range_has_its_comparison_reported_not_judged(
    tmp_path: Path, value: float
) -> None:
    # The champion's rmse of infinity failed a sound candidate's comparison as "undefined on this holdout";
    # one of 1.2e38 (predictions of 4e38) passed any candidate. Neither is a comparison: it is reported, as
    # for a champion that cannot be loaded, and the candidate judged on its absolute checks.
    gate = Gate(tmp_path, evaluator=OverflowingEvaluator(tmp_path, value, who="champion"))
    spec = price_spec({"rmse": 5.0})
    await gate.register(gate.train(spec, 1, regression_frame(600)))
    await gate.promote("price", 1)
    registered = gate.train(spec, 2, regression_frame(800, seed=1))
    with capture_logs() as logs:
        await gate.register(registered)
    assert gate.bus.dead_letters == []
    passed = gate.bus.events(of=ValidationPassed)
    assert [e.data.model_version for e in passed] == [1, 2]
    assert passed[1].data.champion_version == 1
    checks = {c.name: c for c in passed[1].data.checks}
    comparison = checks["challenger-vs-champion:rmse"]
    assert comparison.passed and comparison.value is None and comparison.threshold is None
    assert registered.lineage.holdout is not None and registered.lineage.holdout.rows is not None
    assert comparison.detail == (
        f"reported, not judged: champion v1 gives outputs no metric can use: its outputs on 3 of the "
        f"{registered.lineage.holdout.rows:,} holdout rows are NaN, infinite or beyond float32's range "
        f"(magnitude at most 3.4028235e+38), such as {value:.6g}; the candidate is judged on its absolute "
        "checks alone, as a first version is, and its canary rollout compares it live with the stable version"
    )
    assert all_finite(passed[1].data.checks)
    [warning] = [line for line in logs if line["log_level"] == "warning"]
    assert warning["champion"] == 1 and warning["candidate"] == 2
