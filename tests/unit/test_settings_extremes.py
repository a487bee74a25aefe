"""Settings at their extremes: a value the settings accept never crashes a loop at run time, and one past the
bound is refused as the service starts, naming its variable. Durations counted into dates are at most
``SECONDS_MAX`` (a hundred years): monitoring's label wait of some 2,000 years put its cutoffs before year 1,
and every tick failed. A failing handler's retry delay doubles up to 5 s (``RETRY_DELAY_MAX_S``), so any
number of retries waits a number a float holds, and its first delay is at most that too. An interval of
periodic work is at most a day (``INTERVAL_MAX_S``): 1e300 was accepted, and the work never came again. A pool
asks for at most the connections a Postgres server takes (``POSTGRES_CONNECTIONS_MAX``), and a count Postgres
takes as a bigint is bounded far below 2**63."""

from __future__ import annotations

import asyncio
import resource
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from contracts.envelope import CloudEvent
from libs.bus import InMemoryBus, Subscription, Transaction, core
from libs.bus.core import RETRY_DELAY_MAX_S
from libs.http import create_app
from libs.http_server import ClientLimits
from libs.service import load_settings
from libs.settings import INTERVAL_MAX_S, POSTGRES_CONNECTIONS_MAX, SECONDS_MAX, ServiceSettings
from services.audit.settings import AuditSettings
from services.monitoring import api, bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.handlers import plan_labelled_retention
from services.monitoring.ports import EarlyStep
from services.monitoring.settings import LABELLED_ROWS_MAX, ROLLOUT_STEPS_MAX, MonitoringSettings
from services.registry import api as registry_api
from services.registry.settings import UPLOAD_BYTES_MAX, RegistrySettings
from services.serving.adapters.prediction_log import KafkaPredictionLog
from services.serving.settings import ServingSettings
from services.training.settings import TrainingSettings
from services.training.worker import prepare_fit_process
from services.validation.settings import LATENCY_BATCH_ROWS_MAX, ValidationSettings
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
    (ServingSettings, "DRIFTLOOP_CONSUMER_RETRY_BACKOFF_S", "1e9"),
    (ServingSettings, "DRIFTLOOP_DB_POOL_MAX", str(10**9)),
    (RegistrySettings, "DRIFTLOOP_REGISTRY_READ_POOL_MAX", str(10**9)),
    (ServingSettings, "DRIFTLOOP_BUS_RETENTION_INTERVAL_S", "1e300"),
    (AuditSettings, "DRIFTLOOP_AUDIT_CHECKPOINT_EVERY_S", "1e300"),
    (ServingSettings, "DRIFTLOOP_SERVING_ROUTING_POLL_S", "1e300"),
    (ServingSettings, "DRIFTLOOP_SERVING_SAMPLES_FLUSH_S", "1e300"),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_TICK_SECONDS", "1e300"),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_PERFORMANCE_WINDOW_LABELS", str(2**63)),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_MAX_WATCHED_ROLLOUT_STEPS", str(2**63)),
    (MonitoringSettings, "DRIFTLOOP_MONITORING_MAX_KEPT_ROLLOUT_STEPS", str(2**63)),
    (TrainingSettings, "DRIFTLOOP_TRAINING_HEARTBEAT_INTERVAL_S", "1e9"),
    (TrainingSettings, "DRIFTLOOP_TRAINING_PROGRESS_INTERVAL_S", "1e300"),
    (TrainingSettings, "DRIFTLOOP_TRAINING_RUNNER_POLL_S", "1e300"),
    (ValidationSettings, "DRIFTLOOP_VALIDATION_LATENCY_BATCH_ROWS", str(10**12)),
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


AT_THE_BOUND = [
    (ServingSettings, "consumer_retry_backoff_s", RETRY_DELAY_MAX_S, {}),
    (ServingSettings, "db_pool_max", POSTGRES_CONNECTIONS_MAX, {}),
    (RegistrySettings, "read_pool_max", POSTGRES_CONNECTIONS_MAX, {}),
    (ServingSettings, "bus_retention_interval_s", INTERVAL_MAX_S, {}),
    (AuditSettings, "checkpoint_every_s", INTERVAL_MAX_S, {}),
    (ServingSettings, "routing_poll_s", INTERVAL_MAX_S, {}),
    (ServingSettings, "samples_flush_s", INTERVAL_MAX_S, {}),
    (MonitoringSettings, "tick_seconds", INTERVAL_MAX_S, {}),
    (MonitoringSettings, "performance_window_labels", LABELLED_ROWS_MAX, {}),
    (MonitoringSettings, "max_watched_rollout_steps", ROLLOUT_STEPS_MAX, {}),
    (MonitoringSettings, "max_kept_rollout_steps", ROLLOUT_STEPS_MAX, {}),
    # A heartbeat's stale time must be more than twice it.
    (TrainingSettings, "heartbeat_interval_s", INTERVAL_MAX_S, {"stale_after_s": 2 * INTERVAL_MAX_S + 1}),
    (TrainingSettings, "progress_interval_s", INTERVAL_MAX_S, {}),
    (TrainingSettings, "runner_poll_s", INTERVAL_MAX_S, {}),
    (ValidationSettings, "latency_batch_rows", LATENCY_BATCH_ROWS_MAX, {}),
]


@pytest.mark.parametrize(("settings_class", "field", "bound", "beside"), AT_THE_BOUND)
def test_a_setting_at_its_documented_bound_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
    settings_class: type[ServiceSettings],
    field: str,
    bound: float,
    beside: dict[str, float],
) -> None:
    for name, value in {field: bound, **beside}.items():
        monkeypatch.setenv(f"DRIFTLOOP_{settings_class.service.upper()}_{name.upper()}", str(value))
    settings = settings_class()
    assert getattr(settings, field) == bound
    # The bound the description states, as the settings' documentation shows it.
    description = settings_class.model_fields[field].description or ""
    assert f"{bound:,.0f}" in description


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> LastingWindowStore:
    lasting = LastingWindowStore(failing={})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: lasting)
    monkeypatch.setattr("time.time", lambda: NOW)
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


def recorded_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the bus's consumers sleep from now on, each slept as 0."""
    waited: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        waited.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(core.asyncio, "sleep", sleep)
    return waited


async def test_a_failing_handlers_retry_delay_doubles_up_to_five_seconds_however_many_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Uncapped, the 20th retry waited 0.2 * 2**19 s (29 hours, the partition held) and the 1,025th raised
    # OverflowError out of the consumer: max_retries needs no bound now.
    waited = recorded_sleeps(monkeypatch)
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


async def test_at_the_backoffs_bound_every_retry_of_a_failing_handler_waits_five_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waited = recorded_sleeps(monkeypatch)

    async def failing(event: CloudEvent[ThingHappened], tx: Transaction) -> None:
        raise RuntimeError("unlucky")

    bus = InMemoryBus(REGISTRY)
    limits = ServiceSettings(
        consumer_max_retries=3, consumer_retry_backoff_s=RETRY_DELAY_MAX_S
    ).consumer_limits()
    bus.subscribe(
        Subscription(consumer="c", topics=["test.things"], handlers={ThingHappened: failing}, **limits)
    )
    await bus.publish(thing(1))
    await bus.drain()

    assert waited == [5.0, 5.0, 5.0]
    assert [dead.reason for dead in bus.dead_letters] == ["handler-failed"]


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
