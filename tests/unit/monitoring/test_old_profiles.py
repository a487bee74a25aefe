"""Reference profiles written before categories were folded (no ``other`` bin).

Such a profile of an id-like column lists every level of the reference: 200,000 frequencies (megabytes)
that monitoring compared every window with, and every fresh id in traffic was a category the reference
never had, so a window of fresh ids drifted and was an unseen-category finding, window after window.
Monitoring now folds such a profile as it loads it, as training folds one now (the levels the model keeps,
every other in one bin); the stored profile is not rewritten. Profiles with the bin, and old ones of no more
levels than a model keeps, are judged as before.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from contracts.common import ArtifactFormat, ArtifactRef, FeatureSpec, FeatureType, ModelSignature, Task
from libs.artifacts import ArtifactStore
from libs.modelspec import CATEGORIES_KEPT_MAX
from libs.profiles import ReferenceProfile, build_profile
from services.monitoring import domain
from services.monitoring.adapters.artifacts import StoreArtifacts
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import (
    DriftPolicy,
    FeatureReference,
    ModelReference,
    judge_feature,
    judge_window,
)
from services.monitoring.handlers import load_reference
from services.monitoring.ports import StoredModel
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import WindowStore
from tests.unit.monitoring.test_domain import closed_window
from tests.unit.monitoring.test_wide_models import logged_request

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PLANS = ["basic", "plus", "premium"]


def training_rows(ids: int, seed: int = 0) -> pd.DataFrame:
    """A plan of three levels and an id-like customer: ``ids`` customers seen once, and one guest in ten."""
    rng = np.random.default_rng(seed)
    guests = ids // 9
    customers = [f"c{i:06d}" for i in range(ids)] + ["guest"] * guests
    return pd.DataFrame({"plan": rng.choice(PLANS, ids + guests, p=[0.5, 0.3, 0.2]), "customer": customers})


def old_model(rows: pd.DataFrame) -> tuple[ReferenceProfile, ModelSignature]:
    """The profile and signature of a version trained before the bound: the profile lists every level of its
    rows (no ``other``), and so does the signature (what the encoder learned, in its order)."""
    features: list[tuple[str, Any]] = [("plan", "categorical"), ("customer", "categorical")]
    signature = ModelSignature(
        features=[
            FeatureSpec(name=name, type=FeatureType.CATEGORICAL, categories=sorted(set(rows[name])))
            for name, _ in features
        ],
        target="y",
        task=Task.REGRESSION,
    )
    return build_profile(rows, features, seed=0), signature


async def loaded(tmp_path: Path, profile: ReferenceProfile, signature: ModelSignature) -> ModelReference:
    """The version's reference as monitoring loads it: the stored profile read back by the handlers."""
    store = ArtifactStore(str(tmp_path))
    stored = store.put(profile.to_bytes())
    ref = ArtifactRef(key=stored.sha256, uri=stored.uri, format=ArtifactFormat.JSON, size_bytes=stored.size)
    monitor = make_monitor(MonitoringSettings(), StoreArtifacts(store), "/test/monitoring")
    model = StoredModel("ids", 1, signature, {"mae": 1.0}, ref)
    # The store is asked only where the version's window starts.
    return await load_reference(model, monitor=monitor, store=WindowStore([], failing={}))  # type: ignore[arg-type]


def window(ref: ModelReference, rows: int, *, fresh_share: float, seed: int) -> Any:
    """A closed window of ``rows`` requests' rows: plans as in training, customers fresh ids (never seen in
    training) in ``fresh_share`` of them and the guest in the others."""
    rng = np.random.default_rng(seed)
    inputs = [
        {
            "plan": str(rng.choice(PLANS, p=[0.5, 0.3, 0.2])),
            "customer": f"n{seed}-{i}" if rng.random() < fresh_share else "guest",
        }
        for i in range(rows)
    ]
    logged = [
        (logged_request("ids", str(r), inputs[r * 50 : (r + 1) * 50], T0 + timedelta(seconds=r)), 0, r)
        for r in range(rows // 50)
    ]
    return closed_window(ref, logged, rows)


@pytest.fixture(scope="module")
def id_like() -> tuple[ReferenceProfile, ModelSignature]:
    """An old version trained on 200,000 customers seen once and a guest: its profile lists them all."""
    return old_model(training_rows(200_000))


async def test_fresh_ids_are_no_drift_against_an_old_profile_of_an_id_like_column(
    tmp_path: Path, id_like: tuple[ReferenceProfile, ModelSignature]
) -> None:
    # A window of fresh ids in the reference's share was the largest possible Jensen–Shannon distance on the
    # ids (0.79 against a threshold of 0.1: drift), and "90.0% of customer are categories the reference never
    # had".
    profile, signature = id_like
    old = profile.feature("customer")
    assert old.kind == "categorical" and old.other is None and len(old.frequencies) == 200_001

    ref = await loaded(tmp_path, profile, signature)

    for rows in (5_000, 500):  # a distance (Jensen–Shannon) and a p-value test (chi-square)
        judgement = judge_window(ref, window(ref, rows, fresh_share=0.9, seed=rows), DriftPolicy())
        assert not judgement.features[1].drifted, judgement.features[1]
        assert judgement.quality == []
    # The levels the model would keep if trained again on these rows, the other ids in one bin.
    customer = ref.features[1]
    assert len(customer.categories) == CATEGORIES_KEPT_MAX and "guest" in customer.categories
    assert customer.other == 200_000 - (CATEGORIES_KEPT_MAX - 1)


async def test_more_fresh_ids_than_the_old_profile_had_are_still_drift(
    tmp_path: Path, id_like: tuple[ReferenceProfile, ModelSignature]
) -> None:
    # Folded, the ids are one bin: a window whose rows are all fresh ids (no guest at all) is a change of
    # that bin's share, found as before.
    profile, signature = id_like
    ref = await loaded(tmp_path, profile, signature)

    judgement = judge_window(ref, window(ref, 5_000, fresh_share=1.0, seed=1), DriftPolicy())
    assert judgement.features[1].drifted


async def test_profiles_with_the_bin_or_with_few_levels_are_judged_as_before(tmp_path: Path) -> None:
    # The old profile's plan (3 levels), an old profile of exactly as many levels as a model keeps, and a
    # profile written with the bin: loaded, each is the reference it always was, and judges alike.
    rows = training_rows(CATEGORIES_KEPT_MAX - 1)  # 999 ids and the guest: 1,000 levels
    profile, signature = old_model(rows)
    folded = build_profile(
        rows,
        [("plan", "categorical"), ("customer", "categorical")],
        seed=0,
        kept={"plan": set(PLANS), "customer": {"guest", "c000001"}},
    )
    for stored, customers in ((profile, CATEGORIES_KEPT_MAX), (folded, 2)):
        ref = await loaded(tmp_path, stored, signature)
        assert len(ref.features[1].categories) == customers
        closed = window(ref, 2_000, fresh_share=0.5, seed=3)
        for feature in ref.features:
            as_before = FeatureReference.from_profile(stored.feature(feature.name))
            assert feature.categories == as_before.categories and feature.other == as_before.other
            assert feature.category_counts is not None and as_before.category_counts is not None
            assert feature.category_counts.tolist() == as_before.category_counts.tolist()
            values = closed.categorical[feature.name]
            assert judge_feature(feature, values, DriftPolicy()) == judge_feature(
                as_before, values, DriftPolicy()
            )


async def test_an_old_profile_is_parsed_and_folded_off_the_event_loop(
    tmp_path: Path, id_like: tuple[ReferenceProfile, ModelSignature], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parsing the 200,000 levels and folding them took ~0.4 s on the event loop at every such version's load,
    # stalling the service's consumers and its HTTP meanwhile.
    profile, signature = id_like
    threads: dict[str, int] = {}
    parse, fold = ReferenceProfile.from_bytes, domain.refolded

    def parsed(data: bytes) -> ReferenceProfile:
        threads["parse"] = threading.get_ident()
        return parse(data)

    def folded(*args: Any) -> Any:
        threads["fold"] = threading.get_ident()
        return fold(*args)

    monkeypatch.setattr(ReferenceProfile, "from_bytes", parsed)
    monkeypatch.setattr(domain, "refolded", folded)

    ref = await loaded(tmp_path, profile, signature)

    assert ref.features[1].other is not None  # folded
    assert threads.keys() == {"parse", "fold"}
    assert threading.get_ident() not in threads.values()
