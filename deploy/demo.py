"""`driftloop demo`: the closed loop, live, with nobody in it.

Scenario 1 — the inputs shift. Version 1 is trained on the reference world and serves live traffic with
ground-truth labels arriving a second later. Then the world's inputs shift (prices, support calls, a new
payment method: a covariate shift, see deploy/scenario.py). The model stays about as accurate, so only
the data says something changed: monitoring's drift tests notice, training retrains on recent labelled
traffic, validation gates the candidate, serving rolls it out step by step, and it is promoted.

Scenario 2 — a bad candidate. A dataset with corrupted labels is uploaded; the model retrained on it
looks fine on its own (corrupted) holdout and passes validation, but live labelled traffic shows it is
worse than the stable version: the canary is judged unhealthy and rolled back.

Both cascades are then printed from the audit trail, with how long each stage took.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from contracts.datasets import DatasetRegistered
from contracts.models import ModelVersionRegistered
from contracts.monitoring import CanaryVerdict, DriftDetected, PerformanceDegraded
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from contracts.training import TrainingCompleted, TrainingFailed, TrainingRequested, TrainingSkipped
from contracts.validation import ValidationFailed, ValidationPassed
from deploy.loop import EventTail, LoopClient, Seen, Traffic, spec_yaml
from deploy.platform import Platform
from deploy.scenario import INPUTS_SHIFTED, REFERENCE, TARGET, generate
from services.audit.cli import markup_text

console = Console(highlight=False)


def describe(seen: Seen) -> str | None:
    """One line (markup) for the events worth narrating; None for the rest. Every value from an event is
    escaped: producers write them, and a message holding "[/]" stopped the demo with rich's MarkupError."""
    e, d = seen.event, seen.event.data
    if isinstance(d, DatasetRegistered):
        return (
            f"dataset [bold]{escape(d.name)}[/] v{d.dataset_version} registered ({d.row_count} rows, from "
            f"{escape(d.source)})"
        )
    if isinstance(d, TrainingRequested):
        return f"retrain requested ({escape(d.trigger.value)}): {escape(d.reason)}"
    if isinstance(d, TrainingSkipped):
        return f"retrain skipped: {d.reason.value} — {escape(d.message)}"
    if isinstance(d, TrainingCompleted):
        metrics = ", ".join(
            f"{k} {v:.3f}" for k, v in sorted(d.metrics.items()) if k in ("roc_auc", "accuracy")
        )
        return f"training completed in {d.duration_seconds:.1f}s on {d.train_rows} rows: {metrics}"
    if isinstance(d, TrainingFailed):
        return f"[red]training failed[/]: {d.reason.value} — {escape(d.message)}"
    if isinstance(d, ModelVersionRegistered):
        return f"registry: version [bold]{d.model_version}[/] registered as {d.stage.value}"
    if isinstance(d, ValidationPassed | ValidationFailed):
        verdict = "[green]passed[/]" if isinstance(d, ValidationPassed) else "[red]failed[/]"
        checks = escape(", ".join(c.name for c in d.checks if not c.passed)) or f"{len(d.checks)} checks"
        return f"validation of v{d.model_version} {verdict} ({checks})"
    if isinstance(d, DriftDetected):
        top = sorted(d.features, key=lambda f: f.p_value if f.p_value is not None else 1.0)[:3]
        evidence = "; ".join(
            f"{escape(f.feature)} {f.test.value}={f.statistic:.3g}" for f in top if f.drifted
        )
        return (
            f"[yellow]drift detected[/] on v{d.model_version}: {len(d.drifted_features)}/{len(d.features)} "
            f"features ({evidence})"
        )
    if isinstance(d, PerformanceDegraded):
        side = "below" if d.higher_is_better else "above"
        return (
            f"[yellow]performance degraded[/] on v{d.model_version}: {escape(d.metric)} {d.value:.3f} is "
            f"{side} {d.threshold:.3f} over {d.labelled_rows} labelled rows"
        )
    if isinstance(d, RolloutStarted):
        steps = " → ".join(f"{w:.0%}" for w in d.steps)
        return f"rollout of v{d.canary_version} started ({steps}), canary at {d.weight:.0%}"
    if isinstance(d, CanaryVerdict):
        colour = {"healthy": "green", "unhealthy": "red"}.get(d.verdict.value, "yellow")
        return (
            f"canary verdict for step {d.step_index}: [{colour}]{d.verdict.value}[/] "
            f"({d.canary_samples} canary / {d.stable_samples} stable samples) {escape(d.reason)}"
        )
    if isinstance(d, RolloutStepAdvanced):
        return f"canary v{d.canary_version} advanced to {d.weight:.0%}"
    if isinstance(d, RolloutPromoted):
        return f"[green bold]v{d.model_version} promoted to production[/] after {d.duration_seconds:.1f}s"
    if isinstance(d, RolloutRolledBack):
        return f"[red bold]v{d.canary_version} rolled back[/] ({d.reason.value}): {escape(d.message)}"
    del e
    return None


class Narrator:
    """Prints the platform's own events about the demo's model as they arrive."""

    def __init__(self, model: str, dataset: str) -> None:
        self.model = model
        self.dataset = dataset
        self.started = time.monotonic()

    def __call__(self, seen: Seen) -> None:
        subject = seen.event.subject
        if subject not in (self.model, self.dataset) and not (subject or "").startswith(self.model):
            return
        line = describe(seen)
        if line is not None:
            console.print(f"  [dim]{seen.seen_at - self.started:7.1f}s[/]  {line}")


def stage(text: str) -> None:
    console.print(f"\n[bold cyan]▶ {text}[/]")


async def run(platform: Platform, bootstrap: str, *, prefix: str = "") -> int:
    """The whole demo against a running platform; returns the exit code."""
    model = f"churn-{secrets.token_hex(2)}"
    dataset = f"{model}-base"
    client = LoopClient(platform)
    narrator = Narrator(model, dataset)
    tail = EventTail(bootstrap, prefix=prefix, on_event=narrator)
    await tail.start()
    traffic: Traffic | None = None
    try:
        stage(f"Version 1 of model '{model}': spec, dataset, training, validation, first rollout")
        await client.put_spec(model, spec_yaml(model, dataset=dataset, cooldown_s=COOLDOWN_S))
        console.print("  spec registered with training (logistic regression, gates: roc_auc ≥ 0.7)")
        await client.upload_dataset(dataset, generate(20_000, REFERENCE, seed=1), [model])
        await tail.wait_for(RolloutPromoted, lambda e: e.subject == model, deadline_s=180)
        await client.wait_served(model)

        stage("Live traffic from the reference world (20 requests/s × 25 customers, labels 1 s later)")
        traffic = Traffic(client, model, phase=REFERENCE, requests_per_s=20, rows_per_request=25)
        traffic.start()
        await asyncio.sleep(20)
        alerts = [e for e in tail.events((DriftDetected, PerformanceDegraded)) if e.subject == model]
        quiet = "no alert so far" if not alerts else f"[red]{len(alerts)} alert(s) already[/]"
        console.print(f"  {traffic.stats.requests} requests, {traffic.stats.failed} failed, {quiet}")

        stage("The inputs shift: prices +35 %, more support calls, a new payment method")
        # Who leaves still follows the same rule, so the model stays about as accurate: only the inputs'
        # distributions show the change, and drift detection is the signal that starts the cascade.
        traffic.phase = INPUTS_SHIFTED
        promoted = await tail.wait_for(
            (RolloutPromoted, RolloutRolledBack),
            lambda e: e.subject == model and _rolled_out(e) >= 2,
            deadline_s=300,
        )
        first_cascade = promoted.correlationid
        ok_first = isinstance(promoted.data, RolloutPromoted)

        stage("A bad candidate: a dataset with corrupted labels is uploaded")
        await _past_cooldown(tail, model, COOLDOWN_S)
        corrupted = generate(20_000, INPUTS_SHIFTED, seed=99)
        corrupted[TARGET] = 1 - corrupted[TARGET]
        await client.upload_dataset(dataset, corrupted, [model])
        bad = await tail.wait_for(
            DatasetRegistered, lambda e: e.subject == dataset and e.data.dataset_version >= 2, deadline_s=60
        )
        outcome = await tail.wait_for(
            (RolloutRolledBack, RolloutPromoted, ValidationFailed, TrainingFailed, TrainingSkipped),
            lambda e: e.correlationid == bad.correlationid,
            deadline_s=240,
        )
        second_cascade = bad.correlationid
        caught = isinstance(outcome.data, RolloutRolledBack | ValidationFailed)
    finally:
        if traffic is not None:
            await traffic.stop()
        await tail.stop()

    stage("The audit trail of both cascades")
    for title, correlation in (
        (f"{_signal(tail, first_cascade)} → promotion", first_cascade),
        ("bad candidate → rollback", second_cascade),
    ):
        await print_trace(client, title, correlation)
    verify = await client.audit_verify()
    verdict = "[green]verified[/]" if verify.get("ok") else f"[red]BROKEN[/] {markup_text(str(verify))}"
    console.print(f"\n  audit chain: {verdict} ({verify.get('rows_checked', '?')} rows checked)")
    stats = traffic.stats if traffic is not None else None
    if stats is not None:
        console.print(
            f"  traffic: {stats.requests} requests, {stats.rows} predictions, {stats.failed} failed, "
            f"{stats.labels_sent} labels; by variant {stats.by_variant}"
        )
        for failure in stats.failures[:5]:
            console.print(f"  [red]failed request[/]: {escape(str(failure))}")
    await client.close()
    ok = ok_first and caught and (stats is None or stats.failed == 0)
    console.print(
        "\n[bold green]The loop closed twice with nobody in it.[/]"
        if ok
        else "\n[bold red]The demo did not go as expected; see the lines above and "
        f"{escape(str(platform.log.parent))}/.[/]"
    )
    return 0 if ok else 1


COOLDOWN_S = 20.0


def _signal(tail: EventTail, correlation_id: str) -> str:
    """What started a cascade that monitoring started: its root event is the correlation id."""
    for event in tail.events((DriftDetected, PerformanceDegraded)):
        if event.id == correlation_id:
            return "data drift" if isinstance(event.data, DriftDetected) else "degraded performance"
    return "retrain"


def _rolled_out(event: Any) -> int:
    d = event.data
    return int(d.model_version if isinstance(d, RolloutPromoted) else d.canary_version)


async def _past_cooldown(tail: EventTail, model: str, cooldown_s: float) -> None:
    """Wait until the retrain cooldown since the model's last completed training has passed."""
    done = [
        s.seen_at
        for s in tail.seen
        if isinstance(s.event.data, TrainingCompleted) and s.event.subject == model
    ]
    if done:
        await asyncio.sleep(max(0.0, max(done) + cooldown_s + 1 - time.monotonic()))


async def print_trace(client: LoopClient, title: str, correlation_id: str) -> None:
    """One cascade from the audit service: each event, with time since the cascade began."""
    trace = await client.audit_trace(correlation_id)
    rows = _flatten(trace)
    heading = f"{title} — correlation {markup_text(correlation_id[:8])}…"
    table = Table(title=heading, show_edge=False, header_style="bold")
    for column in ("+s", "step", "event", "by", "subject"):
        table.add_column(column)
    start: datetime | None = None
    previous: datetime | None = None
    for row in rows:
        when = datetime.fromisoformat(str(row["time"]).replace("Z", "+00:00"))
        start = start or when
        step = f"{(when - previous).total_seconds():.1f}" if previous else "-"
        previous = when
        table.add_row(
            f"{(when - start).total_seconds():.1f}",
            step,
            # Producers wrote these: markup prints as written, a terminal control as its escape (`\x1b`).
            markup_text(str(row["type"]).removeprefix("io.driftloop.").removesuffix(".v1")),
            markup_text(str(row.get("source", "")).removeprefix("/driftloop/")),
            markup_text(str(row.get("subject") or "")),
        )
    console.print(table)


def _flatten(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace's events in time order, whatever its tree shape."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") is not None and node.get("time") is not None:  # an event, with its time
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(trace)
    unique = {str(n.get("id", id(n))): n for n in found}
    return sorted(unique.values(), key=lambda n: str(n["time"]))
