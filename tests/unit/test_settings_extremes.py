"""Settings at their extremes: a value the settings accept never crashes a loop at run time, and one past the
bound is refused as the service starts, naming its variable. Durations counted into dates are at most
``SECONDS_MAX`` (a hundred years): monitoring's label wait of some 2,000 years put its cutoffs before year 1,
and every tick failed. A failing handler's retry delay doubles up to 5 s (``RETRY_DELAY_MAX_S``), so any
number of retries waits a number a float holds."""

from __future__ import annotations

import asyncio
import resource
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from contracts.envelope import CloudEvent
from libs.bus import InMemoryBus, Subscription, Transaction, core
from libs.http import create_app
from libs.http_server import ClientLimits
from libs.service import load_settings
from libs.settings import SECONDS_MAX, ServiceSettings
from services.monitoring import api, bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.handlers import plan_labelled_retention
from services.monitoring.ports import EarlyStep
from services.monitoring.settings import MonitoringSettings
from services.registry import api as registry_api
from services.registry.settings import UPLOAD_BYTES_MAX, RegistrySettings
from services.serving.adapters.prediction_log import KafkaPredictionLog
from services.serving.settings import ServingSettings
from services.training.settings import TrainingSettings
from services.training.worker import prepare_fit_process
from tests.unit.monitoring.test_canary_watch import LastingWindowStore, Runtime
from tests.unit.monitoring.test_domain import reference, requests
from tests.unit.monitoring.test_labelled_retention import Labelled
from tests.unit.registry.test_api import OPERATOR, NoReads
from tests.unit.test_bus import REGISTRY, ThingHappened, thing

NOW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()

PAST_THE_BOUND = [
    (MonitoringSettings, "DRIFTLOOP_MONITORING_LABEL_WAIT_SECONDS", "1e11"),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_MAX_CLOCK_SKEW_SECONDS", "1e11"),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_CANARY_LABEL_GRACE_SECONDS", "1e11"),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_ROLLOUT_START_WAIT_SECONDS", "1e11"),
    (TrainingSettings, "DRIFTLOOP_TRAINING_STALE_AFTER_S", "1e11"),
    (RegistrySettings, "DRIFTLOOP_REGISTRY_MAX_UPLOAD_BYTES", str(2**63 - 1)),
    (ServingSettings, "DRIFTLOOP_SERVING_PREDICTION_LOG_LINGER_MS", "1" + "0" * 312),
    (ServingSettings, "DRIFTLOOP_HTTP_BODY_MIN_BYTES_PER_S", "1" + "0" * 309),
    (ServingSettings, "DRIFTLOOP_SERVING_PREDICTION_LOG_HANDOFF_BYTES", str(2**32)),
    (TrainingSettings, "DRIFTLOOP_TRAINING_FIT_MEMORY_LIMIT_MB", str(2**43)),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_EXPORT_LABELLED_ROWS", str(2**63)),
]


@pytest.mark.parametrize(("settings_class", "variable", "value"), PAST_THE_BOUND)
def test_a_value_past_its_bound_stops_the_service_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    settings_class: type[ServiceSettings],
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        load_settings(settings_class)
    assert stopped.value.code == 2
    refused = f"{variable}={value!r} is not valid: Input should be less than or equal to"
    assert refused in capsys.readouterr().err


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> LastingWindowStore:
    lasting = LastingWindowStore(failing={})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: lasting)
    monkeypatch.setattr(bootstrap.time, "time", lambda: NOW)
    return lasting


def monitoring_at_the_bounds() -> MonitoringSettings:
    return MonitoringSettings(
        label_wait_seconds=SECONDS_MAX,
        max_clock_skew_seconds=SECONDS_MAX,
        canary_label_grace_seconds=SECONDS_MAX,
        rollout_start_wait_seconds=SECONDS_MAX,
        labelled_keep_days=30,
    )


async def test_monitorings_tick_runs_with_its_waits_at_their_bounds(store: LastingWindowStore) -> None:
    monitor = make_monitor(monitoring_at_the_bounds(), artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(reference())
    monitor.live.ingest(requests(50, seed=1), arrival=NOW)
    background = Background(Runtime(), monitor, tick_s=1.0)  # type: ignore[arg-type]

    await background.once()

    assert background.failed_task is None


async def test_the_joined_labels_retention_plans_with_the_waits_at_their_bounds() -> None:
    monitor = make_monitor(monitoring_at_the_bounds(), artifacts=None, source="/t")
    monitor.clock = lambda: NOW
    exported = {"churn": datetime(2026, 1, 1, tzinfo=UTC)}  # the export's horizon, later than the cutoff
    labelled = Labelled({"churn": {"p-1": NOW - 86_400}}, exported=exported)
    plan = await plan_labelled_retention(monitor=monitor, store=labelled)  # type: ignore[arg-type]
    # Kept three times 36,500 days (twice the wait plus the skew), counted back from now into 1727.
    assert [(model, before.year) for model, before in plan] == [("churn", 1727)]


def test_the_status_dates_a_kept_steps_expiry_with_the_start_wait_at_its_bound() -> None:
    monitor = make_monitor(monitoring_at_the_bounds(), artifacts=None, source="/t")
    step = EarlyStep("r-1", 1, "churn", 1, 2, NOW, "c", "c", None, received_at=NOW)
    expires = datetime.fromisoformat(api._kept_public(step, monitor)["expires_at"])
    assert expires - datetime.fromtimestamp(NOW, UTC) == timedelta(seconds=SECONDS_MAX)


def test_training_looks_for_stale_jobs_with_a_date_that_exists_at_its_bound() -> None:
    stale = timedelta(seconds=TrainingSettings(stale_after_s=SECONDS_MAX).stale_after_s)
    # What claim_next sends Postgres (now() - $1::interval): a date after 4713 BC, and in Python's range too.
    assert (datetime.fromtimestamp(NOW, UTC) - stale).year == 1926


async def test_a_failing_handlers_retry_delay_doubles_up_to_five_seconds_however_many_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Uncapped, the 20th retry waited 0.2 * 2**19 s (29 hours, the partition held) and the 1,025th raised
    # OverflowError out of the consumer: max_retries needs no bound now.
    waited: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        waited.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(core.asyncio, "sleep", sleep)
    attempts: list[int] = []

    async def failing(event: CloudEvent[ThingHappened], tx: Transaction) -> None:
        attempts.append(event.data.n)
        raise RuntimeError("unlucky")

    bus = InMemoryBus(REGISTRY)
    limits = ServiceSettings(consumer_max_retries=1_100).consumer_limits()
    bus.subscribe(
        Subscription(consumer="c", topics=["test.things"], handlers={ThingHappened: failing}, **limits)
    )
    await bus.publish(thing(1))
    await bus.drain()

    assert len(attempts) == 1 + 1_100
    assert [dead.reason for dead in bus.dead_letters] == ["handler-failed"]
    assert waited[:7] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert len(waited) == 1_100
    assert max(waited) == 5.0


async def test_the_registry_reads_an_upload_spooled_to_disk_with_its_limit_at_the_bound(
    tmp_path: Path,
) -> None:
    # Read with the limit's size, a part over 1 MiB (spooled to a file) asked for a terabyte of memory:
    # MemoryError, a 500. Past the check the file is decoded, and its header refused (422, no database here).
    settings = RegistrySettings(
        env="test", auth_tokens_file=tmp_path / "tokens.json", max_upload_bytes=UPLOAD_BYTES_MAX
    )
    app = create_app(settings, title="registry", description="", routers=[registry_api.router])
    app.state.reads = NoReads()
    body = ("a," + "x" * 300 + "\n" + "1,2\n" * 600_000).encode()  # 2.4 MB
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
        r = await client.post(
            "/v1/datasets",
            data={"name": "churn"},
            files={"file": ("d.csv", body, "text/csv")},
            headers=OPERATOR,
        )
    assert r.status_code == 422, r.text
    assert "column 2 of the header" in r.json()["detail"]


def test_the_http_server_sets_its_body_rate_at_the_bound() -> None:
    limits = ClientLimits(ServiceSettings(http_body_min_bytes_per_s=10**12), max_connections=10)
    assert limits.s_per_body_byte == 1e-12


async def test_the_prediction_logs_producer_is_made_with_its_linger_at_the_bound() -> None:
    settings = ServingSettings(prediction_log_linger_ms=60_000)
    log = KafkaPredictionLog(settings.kafka, source="/t", buffer=10, batch=10, linger_ms=60_000)
    producer = log._new_producer()  # as run() makes it; aiokafka divides the linger into seconds here
    assert producer is not None


def test_a_fit_process_takes_its_memory_limit_at_the_bound() -> None:
    limit_mb = TrainingSettings(fit_memory_limit_mb=2**30).fit_memory_limit_mb
    assert limit_mb is not None
    before = resource.getrlimit(resource.RLIMIT_AS)
    try:
        prepare_fit_process(None, limit_mb * 2**20)  # as the fit pool's initializer is given it
        assert resource.getrlimit(resource.RLIMIT_AS)[0] in (2**50, before[1])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)
