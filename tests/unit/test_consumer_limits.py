"""An operator sets how often a service's consumers retry a failing handler, through the settings every
service shares: ``consumer_max_retries``, ``consumer_retry_backoff_s`` and ``consumer_max_uncertain_retries``
(an OSError or a timeout of the handler's that may be an outage or its own doing; it was a fixed 20)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from contracts.envelope import CloudEvent
from deploy.settings_doc import SERVICE_SETTINGS
from libs.bus import InMemoryBus, Subscription, Transaction
from libs.service import Runtime
from libs.settings import ServiceSettings
from services.audit.bootstrap import trail_subscription
from services.audit.domain import Signer
from services.audit.settings import AuditSettings
from services.monitoring.bootstrap import subscriptions
from services.monitoring.settings import MonitoringSettings
from services.registry import bootstrap as registry
from services.registry.settings import RegistrySettings
from services.training import bootstrap as training
from services.training.settings import TrainingSettings
from services.validation import bootstrap as validation
from services.validation.settings import ValidationSettings
from tests.unit.test_bus import REGISTRY, ThingHappened, thing


@pytest.mark.parametrize("settings_class", SERVICE_SETTINGS, ids=lambda c: c.service)
def test_every_service_reads_the_uncertain_retry_bound_from_its_environment(
    settings_class: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_CONSUMER_MAX_UNCERTAIN_RETRIES", "4")
    monkeypatch.setenv(f"DRIFTLOOP_{settings_class.service.upper()}_CONSUMER_MAX_RETRIES", "1")

    limits = settings_class().consumer_limits()

    assert (limits["max_uncertain_retries"], limits["max_retries"]) == (4, 1)


def _runtime(settings: ServiceSettings) -> Runtime:
    # The subscription functions read only the runtime's settings and source.
    return cast(Runtime, SimpleNamespace(settings=settings, source=lambda: f"/driftloop/{settings.service}"))


def _built_subscriptions(limits: dict[str, Any]) -> dict[str, list[Subscription]]:
    """Every subscription the services build from their settings (serving builds its own inside ``build``)."""
    nothing: Any = object()  # stores and monitors the subscriptions only bind, never call here
    return {
        "registry": [registry.subscription(_runtime(RegistrySettings(**limits)), nothing, consumer="r")],
        "training": [
            training.subscription(_runtime(TrainingSettings(**limits)), nothing, consumer="t", topics=["x"])
        ],
        "validation": [
            validation.subscription(
                _runtime(ValidationSettings(**limits)), nothing, consumer="v", topics=["x"]
            )
        ],
        "monitoring": subscriptions(MonitoringSettings(**limits), nothing),
        "audit": [trail_subscription(AuditSettings(**limits), Signer(bytes(range(32))), "/driftloop/audit")],
    }


def test_the_services_subscriptions_take_their_retry_limits_from_the_settings() -> None:
    limits = {"consumer_max_retries": 1, "consumer_retry_backoff_s": 0.5, "consumer_max_uncertain_retries": 4}

    taken = {
        service: {(s.max_retries, s.retry_backoff_s, s.max_uncertain_retries) for s in subs}
        for service, subs in _built_subscriptions(limits).items()
    }

    assert taken == {service: {(1, 0.5, 4)} for service in taken}


async def test_an_uncertain_error_is_dead_lettered_after_the_configured_number_of_retries() -> None:
    settings = MonitoringSettings(consumer_max_uncertain_retries=2, consumer_retry_backoff_s=0.001)
    calls: list[int] = []

    async def times_out(event: CloudEvent[Any], tx: Transaction) -> None:
        calls.append(event.data.n)
        raise TimeoutError("the handler's own wait ran out")

    bus = InMemoryBus(REGISTRY)
    bus.subscribe(
        Subscription(
            consumer="c",
            topics=["test.things"],
            handlers={ThingHappened: times_out},
            **settings.consumer_limits(),
        )
    )
    await bus.publish(thing(1))
    await bus.drain()

    [dead] = bus.dead_letters
    assert (dead.reason, len(calls)) == ("handler-failed", 3)
