"""Reference profiles: what a feature looked like in the data a model was trained on.

Training computes a profile from the training set and stores it (JSON) in the artifact store next to
the model; monitoring loads it and compares live windows against it. Numeric features keep quantile bin
edges with their histogram (for PSI and Jensen–Shannon), summary statistics, and a bounded sorted sample
(for Kolmogorov–Smirnov and Wasserstein); categorical features keep category frequencies: of the levels the
model keeps, with every other level's values counted in one bin (``other``), so that an id-like column makes
a profile of at most as many frequencies as the model keeps levels, not one per distinct value.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import numpy as np
import orjson
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from libs.modelspec import CATEGORIES_KEPT_MAX, most_frequent_levels

DEFAULT_SAMPLE_SIZE = 10_000
DEFAULT_BINS = 10
MISSING_CATEGORY = "__missing__"


class _Frozen(BaseModel):
    # No NaN or infinity: JSON would write null, and monitoring could not load the profile back.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class NumericProfile(_Frozen):
    """A numeric feature in the reference data."""

    kind: Literal["numeric"] = "numeric"
    name: str = Field(description="Feature name.")
    count: int = Field(description="Non-missing values.")
    missing: int = Field(description="Missing (null or NaN) values.")
    mean: float | None = Field(description="Mean of the non-missing values.")
    std: float | None = Field(description="Standard deviation (ddof=0).")
    min: float | None = Field(description="Smallest value.")
    max: float | None = Field(description="Largest value.")
    edges: list[float] = Field(
        description="Inner bin edges at reference quantiles; bins (-inf, e0], (e0, e1], ..., (e_last, inf)."
    )
    histogram: list[int] = Field(description="Reference counts per bin (len(edges) + 1 bins).")
    sample: list[float] = Field(description="Sorted random sample of the values, for KS and Wasserstein.")


class CategoricalProfile(_Frozen):
    """A categorical feature in the reference data."""

    kind: Literal["categorical"] = "categorical"
    name: str = Field(description="Feature name.")
    count: int = Field(description="Non-missing values.")
    missing: int = Field(description="Missing values.")
    frequencies: dict[str, int] = Field(
        description="Count per category (as text). With ``other`` set, exactly the levels the model keeps "
        "(0 for one the reference does not have); without, every category of the reference."
    )
    other: int | None = Field(
        default=None,
        ge=0,
        description="Values of the categories the model does not keep, counted in one bin (the model encodes "
        "them as unseen). None in a profile that lists every category of the reference (written before "
        "categories were folded, or without the model's levels).",
    )


FeatureProfile = Annotated[NumericProfile | CategoricalProfile, Field(discriminator="kind")]


class ReferenceProfile(_Frozen):
    """Per-feature reference distributions of one model version's training data."""

    rows: int = Field(description="Rows behind the profile.")
    created_at: datetime = Field(description="When the profile was computed.")
    features: list[FeatureProfile] = Field(description="One profile per input feature, in signature order.")
    prediction: FeatureProfile | None = Field(
        default=None, description="The model's outputs on the reference data (score or class), if known."
    )

    def feature(self, name: str) -> NumericProfile | CategoricalProfile:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_bytes(self, encoded_features: bytes | None = None) -> bytes:
        """The profile as JSON (sorted keys); ``encoded_features`` is ``encode_features(self.features)``
        when it was encoded ahead (most of the bytes are the features' samples)."""
        if encoded_features is None:
            return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        data = self.model_dump(mode="json", exclude={"features"})
        data["features"] = orjson.Fragment(encoded_features)
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceProfile:
        return cls.model_validate(orjson.loads(data))


def numeric_bin_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Inner edges at the reference quantiles, deduplicated (ties collapse bins)."""
    if values.size == 0:
        return np.array([], dtype=float)
    levels = np.linspace(0, 1, bins + 1)[1:-1]
    with np.errstate(over="ignore", invalid="ignore"):
        qs = np.quantile(values, levels)
    if not np.isfinite(qs).all():
        # Interpolating between values near the double's limits (-1e308 and 1e308) overflows to an
        # infinite or NaN edge, which JSON cannot hold: the edges are then the values themselves.
        qs = np.quantile(values, levels, method="lower")
    return np.unique(qs)


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts in the bins (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    idx = np.searchsorted(edges, values, side="left")
    return np.bincount(idx, minlength=edges.size + 1)


def sorted_bin_counts(ordered: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """:func:`bin_counts` of values already sorted: one binary search per edge, not per value."""
    upto = np.searchsorted(ordered, edges, side="right")
    return np.diff(np.concatenate(([0], upto, [ordered.size])))


def edge_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """:func:`bin_counts` for a few edges: one vectorised pass per edge instead of a search per value."""
    upto = np.fromiter((np.count_nonzero(values <= e) for e in edges), dtype=np.int64, count=edges.size)
    return np.diff(np.concatenate(([0], upto, [values.size])))


def profile_numeric(
    name: str,
    series: pd.Series,
    *,
    bins: int = DEFAULT_BINS,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
) -> NumericProfile:
    raw = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(raw)
    present = np.ascontiguousarray(raw) if finite.all() else raw[finite]
    # No full sort: the quantiles select (partition), the histogram is one comparison pass per edge, and
    # only the bounded sample is sorted. Measured on 40,000 rows: 1.7 ms per column sorted, 1.2 ms not.
    edges = numeric_bin_edges(present, bins)
    mean, std = _mean_std(present) if present.size else (None, None)
    if present.size > sample_size:
        sample = np.random.default_rng(seed).choice(present, size=sample_size, replace=False)
    else:
        sample = present
    return NumericProfile(
        name=name,
        count=int(present.size),
        missing=int(raw.size - present.size),
        mean=mean,
        std=std,
        min=float(present.min()) if present.size else None,
        max=float(present.max()) if present.size else None,
        edges=edges.tolist(),
        histogram=edge_counts(present, edges).tolist(),
        sample=np.sort(sample).tolist(),
    )


def category_key(value: Any) -> str:
    """The text a category is counted under, in the profile and in live windows alike.

    An integral number is its integer's text whatever its type (a column with a null is float64, so
    training sees 1.0 where serving logs 1; -0.0 is 0); a boolean stays ``True``/``False``, apart from
    1 and 0; text stays itself; any other value is its ``str``.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def count_categories(values: Sequence[Any] | np.ndarray) -> dict[str, int]:
    """Count per :func:`category_key` of the present values (None is missing and not counted).

    Counted by (type, value) first, at C speed: a plain ``Counter`` would merge True with 1 (they hash
    equal), which the keys keep apart.
    """
    raw = Counter(zip(map(type, values), values, strict=True))
    counts: dict[str, int] = {}
    for (_, value), n in raw.items():
        if value is None:
            continue
        key = category_key(value)
        counts[key] = counts.get(key, 0) + n
    return counts


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (ddof=0), finite for any finite values: a sum of values near the
    double's limits overflows, so such values are scaled into [-1, 1] first."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = float(values.mean()), float(values.std())
    if math.isfinite(mean) and math.isfinite(std):
        return mean, std
    scale = float(np.max(np.abs(values)))
    scaled = values / scale
    return float(scaled.mean()) * scale, float(scaled.std()) * scale


def profile_categorical(
    name: str, series: pd.Series, kept: Collection[str] | None = None
) -> CategoricalProfile:
    """A categorical feature's profile; with ``kept`` (the :func:`category_key` of each level the model
    keeps), the frequencies of those levels and the values of every other level in one bin (``other``)."""
    present = series.dropna()
    counts = count_categories(present.tolist())
    if kept is None:
        return CategoricalProfile(
            name=name,
            count=int(present.size),
            missing=int(series.size - present.size),
            frequencies={k: counts[k] for k in sorted(counts)},
        )
    return _folded(name, int(present.size), int(series.size - present.size), counts, kept)


def _folded(
    name: str, count: int, missing: int, counts: Mapping[str, int], kept: Collection[str]
) -> CategoricalProfile:
    levels = set(kept)
    return CategoricalProfile(
        name=name,
        count=count,
        missing=missing,
        frequencies={k: counts.get(k, 0) for k in sorted(levels)},
        other=sum(n for k, n in counts.items() if k not in levels),
    )


def refolded(profile: CategoricalProfile, levels: Sequence[Any] | None) -> CategoricalProfile:
    """A profile written before categories were folded (``other`` None) listing more levels than a model
    keeps (:data:`~libs.modelspec.CATEGORIES_KEPT_MAX`), folded as training folds one now; any other profile
    as it is. ``levels``: the model's levels of the feature (its signature's ``categories``, in the encoder's
    order).

    The profile keeps the model's levels when they are at most that many (declared, or every level a model
    learned): serving knows the same ones. A model trained before the bound learned every level, and its
    signature lists them all; the profile then keeps the most frequent of them in the profile
    (:func:`~libs.modelspec.most_frequent_levels`, equally frequent ones in the model's order), the ones the
    model would keep if trained again on the profiled rows. Every other level's values go to ``other``.
    """
    if profile.other is not None or len(profile.frequencies) <= CATEGORIES_KEPT_MAX:
        return profile
    listed = list(dict.fromkeys(category_key(level) for level in levels or ()))
    if listed and len(listed) <= CATEGORIES_KEPT_MAX:
        kept: Collection[str] = listed
    else:
        # Without the model's levels (a signature that lists none), the profile's, in their text's order.
        candidates = listed or sorted(profile.frequencies)
        kept = [candidates[i] for i in most_frequent_levels(candidates, profile.frequencies)]
    return _folded(profile.name, profile.count, profile.missing, profile.frequencies, kept)


def profile_features(
    columns: Mapping[str, pd.Series],
    features: list[tuple[str, Literal["numeric", "categorical"]]],
    *,
    bins: int = DEFAULT_BINS,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    kept: Mapping[str, Collection[str]] | None = None,
) -> list[NumericProfile | CategoricalProfile]:
    """The features' profiles, in the given order, from their columns (a :class:`ReferenceProfile`'s
    ``features``); it takes columns rather than a frame, so another thread can profile a frame's columns
    while this one keeps using the frame. ``kept``: the levels the model keeps of each categorical feature
    (:func:`category_key` text), the others folded (:func:`profile_categorical`)."""
    profiles: list[NumericProfile | CategoricalProfile] = []
    for name, kind in features:
        if kind == "numeric":
            profiles.append(
                profile_numeric(name, columns[name], bins=bins, sample_size=sample_size, seed=seed)
            )
        else:
            profiles.append(
                profile_categorical(name, columns[name], None if kept is None else kept.get(name))
            )
    return profiles


def encode_features(features: Sequence[NumericProfile | CategoricalProfile]) -> bytes:
    """The JSON of a profile's ``features`` as :meth:`ReferenceProfile.to_bytes` writes it, so it can be
    encoded ahead (on another thread, before the rest of the profile is known)."""
    return orjson.dumps([f.model_dump(mode="json") for f in features], option=orjson.OPT_SORT_KEYS)


def build_profile(
    frame: pd.DataFrame,
    features: list[tuple[str, Literal["numeric", "categorical"]]],
    *,
    predictions: pd.Series | None = None,
    prediction_kind: Literal["numeric", "categorical"] = "numeric",
    bins: int = DEFAULT_BINS,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    kept: Mapping[str, Collection[str]] | None = None,
) -> ReferenceProfile:
    """Profile the given feature columns (and optionally the model's outputs) of a reference frame; ``kept``
    as :func:`profile_features` takes it."""
    profiles = profile_features(
        {name: frame[name] for name, _ in features},
        features,
        bins=bins,
        sample_size=sample_size,
        seed=seed,
        kept=kept,
    )
    prediction: NumericProfile | CategoricalProfile | None = None
    if predictions is not None:
        if prediction_kind == "numeric":
            prediction = profile_numeric(
                "prediction", predictions, bins=bins, sample_size=sample_size, seed=seed
            )
        else:
            prediction = profile_categorical("prediction", predictions)
    return ReferenceProfile(
        rows=len(frame), created_at=datetime.now(UTC), features=profiles, prediction=prediction
    )
