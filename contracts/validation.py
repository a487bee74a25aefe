"""Validation events: the gate between a registered candidate and live traffic, with the full report."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Self

from pydantic import Field, model_validator

from contracts.common import (
    PG_INTEGER_MAX,
    ContractModel,
    DatasetRef,
    FreeText,
    Identifier,
    ModelName,
    ModelVersion,
)
from contracts.envelope import EventPayload

TOPIC = "mlops.validation"


class Comparator(StrEnum):
    """How a check's value is compared with its threshold: passed when ``value <comparator> threshold``."""

    GE = ">="
    GT = ">"
    LE = "<="
    LT = "<"
    EQ = "=="


class CheckKind(StrEnum):
    """The family a validation check belongs to."""

    THRESHOLD = "threshold"
    CHAMPION_CHALLENGER = "champion-challenger"
    SLICE = "slice"
    SIGNATURE = "signature"
    LATENCY = "latency"
    SANITY = "sanity"


class ConfidenceInterval(ContractModel):
    """A two-sided confidence interval (bootstrap, for champion/challenger differences)."""

    low: float = Field(description="Lower bound.", examples=[-0.004])
    high: float = Field(description="Upper bound.", examples=[0.021])
    level: float = Field(gt=0, lt=1, description="Confidence level.", examples=[0.95])


class CheckResult(ContractModel):
    """One validation check: what was measured, against what, and the verdict."""

    name: Identifier = Field(
        min_length=1,
        description="Unique name of the check within the report.",
        examples=["roc_auc>=0.75", "challenger-vs-champion:roc_auc", "slice:plan=basic:roc_auc"],
    )
    kind: CheckKind = Field(description="Family of the check.", examples=["threshold"])
    metric: Identifier | None = Field(
        default=None, description="Metric measured, when there is one.", examples=["roc_auc"]
    )
    value: float | None = Field(
        default=None,
        description="Measured value (for champion/challenger: challenger minus champion); null for checks "
        "with no number, such as signature compatibility.",
        examples=[0.861],
    )
    threshold: float | None = Field(
        default=None, description="Threshold the value is compared with.", examples=[0.75]
    )
    comparator: Comparator | None = Field(
        default=None, description="Passed when value <comparator> threshold."
    )
    interval: ConfidenceInterval | None = Field(
        default=None, description="Confidence interval of the value, when it was estimated."
    )
    passed: bool = Field(description="The check's verdict.")
    detail: FreeText = Field(
        default="", description="Explanation for people.", examples=["0.861 >= 0.75 on 10,000 holdout rows"]
    )


class _ValidationReport(EventPayload):
    """Fields shared by both outcomes of a validation run."""

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="The candidate version validated.", examples=[7])
    report_id: Identifier = Field(
        min_length=1,
        description="Id of the stored report (served by validation over HTTP).",
        examples=["vr-5d1e"],
    )
    checks: list[CheckResult] = Field(
        min_length=1, description="Every check run, in order; part of them when `checks_truncated`."
    )
    failed_checks: list[Identifier] = Field(
        default_factory=list,
        description="Names of the checks that failed, in report order (empty when passed). When "
        "`checks_truncated`, it may name failed checks that `checks` leaves out: every failed check, unless "
        "even the names would pass the event size limit.",
    )
    champion_version: ModelVersion | None = Field(
        default=None,
        description="The production version compared against; null when there is none yet.",
        examples=[6],
    )
    holdout: DatasetRef | None = Field(
        default=None, description="The rows champion and challenger were both scored on."
    )
    duration_seconds: float = Field(ge=0, description="Wall time of the validation.", examples=[1.9])
    checks_total: int | None = Field(
        default=None,
        ge=1,
        le=PG_INTEGER_MAX,
        description="How many checks ran: the length of `checks` unless `checks_truncated`. Null in events "
        "from before it was added (then `checks` is complete).",
        examples=[9],
    )
    failed_checks_total: int | None = Field(
        default=None,
        ge=0,
        le=PG_INTEGER_MAX,
        description="How many checks failed: the length of `failed_checks` unless `checks_truncated`. Null "
        "in events from before it was added.",
        examples=[0],
    )
    checks_truncated: bool = Field(
        default=False,
        description="Every check would pass the event size limit (a slice feature with thousands of "
        "levels), so `checks` holds part of them, in report order. Details longer than 1,000 characters are "
        "cut; then passed checks are left out (slices only reported, then passed slices, then the other "
        "passed checks; the check summing up the slice levels left out, "
        "`slice:<feature>:other-levels:<metric>`, excepted); then failed checks' details are cut to 200 "
        "characters; then failed checks are left out, slices first, while `failed_checks` still names them; "
        "then the slice summary; then the names of the failed checks left out. One failed check always stays "
        "when any failed, so the outcome is the report's. The totals count every check, and the stored "
        "report (validation's `GET /v1/reports/{report_id}`) has every check in full.",
    )

    @model_validator(mode="after")
    def _failed_checks_match(self) -> Self:
        failed = [c.name for c in self.checks if not c.passed]
        if self.checks_truncated:
            passed = {c.name for c in self.checks if c.passed}
            if not set(failed) <= set(self.failed_checks) or passed & set(self.failed_checks):
                raise ValueError(
                    "failed_checks must name every check in checks that did not pass, and none that passed"
                )
        elif sorted(failed) != sorted(self.failed_checks):
            raise ValueError(f"failed_checks must name exactly the checks that did not pass: {failed}")
        if self.checks_total is not None and self.checks_total < len(self.checks):
            raise ValueError(f"checks_total {self.checks_total} is less than the checks in checks")
        if self.failed_checks_total is not None and self.failed_checks_total < len(self.failed_checks):
            raise ValueError(
                f"failed_checks_total {self.failed_checks_total} is less than failed_checks names"
            )
        return self


class ValidationPassed(_ValidationReport):
    """Every check passed: the candidate may take traffic."""

    event_name: ClassVar[str] = "ValidationPassed"
    topic: ClassVar[str] = TOPIC

    @model_validator(mode="after")
    def _all_passed(self) -> Self:
        if self.failed_checks:
            raise ValueError(f"a passed validation has no failed checks, got {self.failed_checks}")
        return self


class ValidationFailed(_ValidationReport):
    """At least one check failed: the candidate is rejected; `failed_checks` says which."""

    event_name: ClassVar[str] = "ValidationFailed"
    topic: ClassVar[str] = TOPIC

    @model_validator(mode="after")
    def _has_failure(self) -> Self:
        if not self.failed_checks:
            raise ValueError("a failed validation names at least one failed check")
        return self
