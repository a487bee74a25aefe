"""Serving's settings: a rollout policy that cannot do what a rollout is for is refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from libs.settings import settings_problems
from services.serving.settings import ServingSettings


def test_canary_steps_that_start_at_full_traffic_are_refused_naming_both_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[1.0] puts every new version on all traffic before any verdict, with no stable traffic to judge it
    against (monitoring's verdict is then inconclusive, and the version rolled back)."""
    monkeypatch.setenv("DRIFTLOOP_SERVING_ROLLOUT_STEPS", "[1.0]")
    with pytest.raises(ValidationError) as caught:
        ServingSettings()
    [problem] = settings_problems(caught.value)
    assert "DRIFTLOOP_SERVING_ROLLOUT_STEPS" in problem and "DRIFTLOOP_SERVING_ROLLOUT_MODE" in problem
    assert "below 1.0" in problem


def test_a_shadow_rollout_may_score_all_traffic_from_its_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """In shadow mode the stable version answers every row: a step of 1.0 shadows all of them."""
    monkeypatch.setenv("DRIFTLOOP_SERVING_ROLLOUT_STEPS", "[1.0]")
    monkeypatch.setenv("DRIFTLOOP_SERVING_ROLLOUT_MODE", "shadow")
    assert ServingSettings().rollout_steps == [1.0]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("[]", "at least one step"),
        ("[0, 1.0]", "shares in (0, 1]"),
        ("[0.5, 1.5]", "shares in (0, 1]"),
        ("[0.5, 0.2, 1.0]", "strictly increasing"),
        ("[0.1, 0.5]", "end at 1.0"),
    ],
)
def test_invalid_steps_are_refused_saying_why(
    monkeypatch: pytest.MonkeyPatch, steps: str, message: str
) -> None:
    monkeypatch.setenv("DRIFTLOOP_SERVING_ROLLOUT_STEPS", steps)
    with pytest.raises(ValidationError) as caught:
        ServingSettings()
    [problem] = settings_problems(caught.value)
    assert "DRIFTLOOP_SERVING_ROLLOUT_STEPS" in problem and message in problem
