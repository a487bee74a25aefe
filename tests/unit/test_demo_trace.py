"""`driftloop demo` prints each cascade from the audit service's trace, whatever its rows hold."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.envelope import new_event
from contracts.examples import EXAMPLES
from contracts.training import TrainingFailed, TrainingRequested
from deploy import demo
from deploy.loop import Seen


class TraceClient:
    """The one LoopClient call print_trace makes, answering with a fixed trace."""

    def __init__(self, trace: dict[str, Any]) -> None:
        self.trace = trace

    async def audit_trace(self, correlation_id: str) -> dict[str, Any]:
        return self.trace


def node(seq: int, event_type: str | None, time: str | None, **children: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "id": f"e{seq}",
        "type": event_type,
        "time": time,
        "source": "/driftloop/training",
        "subject": "churn",
        "error": None,
        "data": {"model": "churn"},
        "dead_letters": [],
        "children": [],
        **children,
    }


async def test_a_trace_row_without_a_time_is_left_out_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    # The trace shows null fields as null: a row whose record cannot be read has no type and no time, an
    # undecodable record may have a type but no time.
    unreadable = node(2, None, None)
    undecodable = node(3, "io.driftloop.TrainingStarted.v1", None)
    root = node(
        1, "io.driftloop.DriftDetected.v1", "2025-03-01T12:00:00.000000Z", children=[unreadable, undecodable]
    )
    await demo.print_trace(TraceClient({"roots": [root], "dead_letters": []}), "drift", "c" * 36)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "DriftDetected" in out and "TrainingStarted" not in out


MARKUP = "KeyError: [plan] then [/] and [link=https://t.example]here[/link]"
"""A message as a producer may write it: rich read it as markup, and "[/]" stopped the demo (MarkupError)."""


def test_the_narration_shows_an_event_s_text_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    failed = EXAMPLES[TrainingFailed].model_copy(update={"message": MARKUP})
    requested = EXAMPLES[TrainingRequested].model_copy(update={"reason": MARKUP})
    narrate = demo.Narrator("churn", "churn-base")
    for payload in (failed, requested):
        narrate(Seen(new_event(payload, source="/driftloop/test"), topic="t", seen_at=narrate.started + 1))
    shown = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert shown.count(MARKUP) == 2, shown


async def test_a_trace_row_s_text_is_shown_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    root = node(1, "io.driftloop.DriftDetected.v1", "2025-03-01T12:00:00.000000Z", subject="[/]x[bold]")
    await demo.print_trace(TraceClient({"roots": [root], "dead_letters": []}), "drift", "c" * 36)  # type: ignore[arg-type]
    assert "[/]x[bold]" in capsys.readouterr().out


async def test_terminal_controls_in_a_trace_row_show_as_escapes(capsys: pytest.CaptureFixture[str]) -> None:
    # ESC starts a sequence that can clear the screen or print over the lines before; U+202E shows the
    # text after it reversed. The audit CLI shows them as escapes, and so does the demo, with its helper.
    root = node(
        1,
        "io.driftloop.Drift\u202eDetected.v1",
        "2025-03-01T12:00:00.000000Z",
        source="/driftloop/train\x9bing",
        subject="churn\x1b[2J\x07",
    )
    await demo.print_trace(TraceClient({"roots": [root], "dead_letters": []}), "drift", "\x1b]0;x" + "c" * 36)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "churn\\x1b[2J\\x07" in out and "Drift\\u202eDetected" in out and "train\\x9bing" in out, out
    assert "\\x1b]0;x" in out, out  # the correlation id in the title
    assert not any(c in out for c in "\x1b\x07\x9b\u202e"), repr(out)
