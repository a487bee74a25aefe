"""A prediction dated in the last microseconds of year 9999 (``datetime.max`` in UTC, the sentinel a careless
producer sends for "no time"): valid by the contract, so it joins its window and can be labelled. Held as
epoch seconds, its time rounds up to 10000-01-01 (a double holds about 30 µs there), and turned back into a
datetime it failed with ValueError ('year 10000 is out of range'): its whole drift window was set aside
unjudged, and its label's join failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from contracts.common import FeatureSpec, FeatureType, ModelSignature, Task
from contracts.monitoring import DriftDetected
from contracts.predictions import PredictionsLogged
from libs.profiles import build_profile
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background
from services.monitoring.domain import DriftPolicy, ModelReference, epoch, from_epoch
from services.monitoring.handlers import _labelled
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import set_aside_count
from tests.unit.monitoring.test_wide_models import Outbox, ReportStore, logged_request, wide_monitor

END_OF_TIME = datetime.max.replace(tzinfo=UTC)
WINDOW_ROWS = 200
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SETTINGS = MonitoringSettings(window_rows=WINDOW_ROWS, min_window_rows=10)


@pytest.mark.parametrize("us", [999_999, 999_990, 999_984])
def test_a_time_in_the_last_microseconds_of_year_9999_comes_back_from_epoch_seconds(us: int) -> None:
    at = END_OF_TIME.replace(microsecond=us)
    back = from_epoch(epoch(at))
    assert back.year == 9999 and abs(back - at) < timedelta(microseconds=100)


@pytest.fixture(scope="module")
def reference() -> ModelReference:
    rng = np.random.default_rng(0)
    profile = build_profile(
        pd.DataFrame({"x": rng.normal(0, 1, 1_000)}),
        [("x", "numeric")],
        predictions=pd.Series(rng.uniform(0, 1, 1_000)),
    )
    signature = ModelSignature(
        features=[FeatureSpec(name="x", type=FeatureType.NUMERIC)],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )
    return ModelReference.build("late", 1, signature, {"accuracy": 0.85}, profile)


def shifted_traffic(first_at: datetime) -> list[tuple[PredictionsLogged, int, int]]:
    """A window of requests of 50 rows shifted by 3 standard deviations, the first one dated ``first_at``."""
    rng = np.random.default_rng(1)
    return [
        (
            logged_request(
                "late",
                str(r),
                [{"x": float(rng.normal(3.0, 1))} for _ in range(50)],
                first_at if r == 0 else T0 + timedelta(seconds=r),
            ),
            0,
            r,
        )
        for r in range(WINDOW_ROWS // 50)
    ]


async def test_a_window_with_a_prediction_dated_at_the_end_of_year_9999_is_judged(
    reference: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ReportStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = wide_monitor(reference, tmp_path, SETTINGS)
    monitor.policies["late"] = DriftPolicy(small_sample_max=10, consecutive_windows=1)
    monitor.live.ingest(shifted_traffic(END_OF_TIME), arrival=epoch(T0))
    outbox = Outbox(1_000_000)
    before = set_aside_count("late", "ValueError")

    await Background(outbox, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set_aside_count("late", "ValueError") == before  # judged, not set aside
    [drift] = [e.data for e in outbox.published if isinstance(e.data, DriftDetected)]
    assert drift.window.start == T0 + timedelta(seconds=1)
    # Windowed as if dated max_clock_skew_seconds ahead of when it came (its row keeps its date).
    assert drift.window.end == T0 + timedelta(seconds=SETTINGS.max_clock_skew_seconds)


def test_a_label_joins_a_prediction_dated_at_the_end_of_year_9999(
    reference: ModelReference, tmp_path: Path
) -> None:
    monitor = wide_monitor(reference, tmp_path, SETTINGS)
    monitor.live.ingest(shifted_traffic(END_OF_TIME), arrival=epoch(T0))
    [hit] = monitor.live.cache.predictions("late", "p-0-0")

    row = _labelled(hit, 1, T0, late=False)

    assert row.predicted_at.year == 9999
