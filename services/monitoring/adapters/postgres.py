"""MonitoringStore on asyncpg, inside the caller's transaction (search_path is the service's schema)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import ValidationError

from contracts.common import NUL_STAND_IN, ArtifactRef, ModelSignature
from libs.db import database_time
from libs.logging import get_logger
from services.monitoring.domain import DriftPolicy, ReportPosition
from services.monitoring.ports import (
    EarlyStep,
    JoinedLabel,
    JudgedReport,
    LabelledRecord,
    PendingLabel,
    PerformanceState,
    StoredModel,
    StoredPolicy,
    StoredStep,
    WindowState,
)

log = get_logger(__name__)


JSONB_INTEGERS = (-(2**63), 2**64 - 1)
"""The integers the jsonb encoder (orjson, ``libs.db``) writes: a signed or an unsigned 64-bit one."""


def _jsonb(value: Any) -> Any:
    """``value`` as jsonb can store it: NUL in every string and key replaced by :data:`NUL_STAND_IN`, and an
    integer beyond 64 bits written as a float, or beyond a double as its decimal text.

    Traffic data (a prediction's inputs and output, a label) may carry NUL or any integer (valid JSON: the
    contracts carry it exactly; serving takes a label of 10**20), but jsonb and its encoder refuse them, and
    one such value would fail the window report or every label joined to its prediction. Ids and names never
    hold one: the contracts refuse it."""
    if isinstance(value, str):
        return value.replace("\x00", NUL_STAND_IN) if "\x00" in value else value
    if type(value) is int and not JSONB_INTEGERS[0] <= value <= JSONB_INTEGERS[1]:
        try:
            return float(value)
        except OverflowError:
            return str(value)
    if isinstance(value, dict):
        return {_jsonb(k): _jsonb(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonb(v) for v in value]
    return value


def _labelled(r: asyncpg.Record) -> LabelledRecord:
    return LabelledRecord(
        prediction_id=r["prediction_id"],
        model=r["model"],
        version=r["version"],
        variant=r["variant"],
        rollout_id=r["rollout_id"],
        predicted_at=r["predicted_at"],
        prediction=r["prediction"],
        score=r["score"],
        label=r["label"],
        observed_at=r["observed_at"],
        late=r["late"],
        inputs=r["inputs"],
        received_at=r["received_at"],
        outside_classes=r["outside_classes"],
    )


def _steps(rows: list[asyncpg.Record]) -> list[StoredStep]:
    return [
        StoredStep(
            rollout_id=r["rollout_id"],
            step_index=r["step_index"],
            model=r["model"],
            stable_version=r["stable_version"],
            canary_version=r["canary_version"],
            started_at=r["started_at"],
            min_samples=r["min_samples"],
            bake_seconds=r["bake_seconds"],
            cause_id=r["cause_id"],
            correlation_id=r["correlation_id"],
            actor=r["actor"],
            state=r["state"],
            verdict=r["verdict"],
            learned_at=r["learned_at"],
        )
        for r in rows
    ]


def _early_steps(rows: list[asyncpg.Record]) -> list[EarlyStep]:
    return [
        EarlyStep(
            rollout_id=r["rollout_id"],
            step_index=r["step_index"],
            model=r["model"],
            stable_version=r["stable_version"],
            canary_version=r["canary_version"],
            started_at=r["started_at"],
            cause_id=r["cause_id"],
            correlation_id=r["correlation_id"],
            actor=r["actor"],
            received_at=r["received_at"],
            given_up_at=r.get("given_up_at"),
        )
        for r in rows
    ]


# A row of labelled (``o``) some query still needs, which keeps every row of its id and model: one not yet
# counted into a performance window (unscored reads it), one received after the cutoff ($2: a join, a
# correction, the restart's labels_joined_since, a window export), and one predicted since the start of a
# rollout step of its model watched (labelled_outcomes compares them) or kept for its start (which watches
# from that start). handlers.prune_labelled says why this is enough.
_LABEL_NEEDED = """o.perf_seq IS NULL OR o.received_at >= $2
    OR EXISTS (SELECT 1 FROM rollout_steps s WHERE s.state = 'watching' AND s.model = o.model
               AND o.predicted_at >= to_timestamp(s.started_at))
    OR EXISTS (SELECT 1 FROM early_steps e WHERE e.model = o.model
               AND o.predicted_at >= to_timestamp(e.started_at))"""


_LOCK_POLICY = (
    "SELECT pg_advisory_xact_lock(hashtext('driftloop-monitoring-policy-' || current_schema() || '-' || $1))"
)


class PgMonitoringStore:
    """The monitoring schema's tables on one connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def now(self) -> datetime:
        return await database_time(self.conn)

    async def save_model(self, model: StoredModel) -> bool:
        status = await self.conn.execute(
            """INSERT INTO model_versions (model, version, signature, baseline, profile)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            model.model,
            model.version,
            model.signature.model_dump(mode="json"),
            model.baseline,
            model.profile.model_dump(mode="json"),
        )
        return bool(status.endswith(" 1"))

    async def models(self) -> list[StoredModel]:
        rows = await self.conn.fetch("SELECT * FROM model_versions ORDER BY model, version")
        return [_stored_model(r) for r in rows]

    async def model(self, model: str, version: int) -> StoredModel | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM model_versions WHERE model = $1 AND version = $2", model, version
        )
        return _stored_model(row) if row is not None else None

    async def policy(self, model: str, *, lock: bool = False) -> DriftPolicy | None:
        if lock:
            # A lock named after the model, not the row's: a model with no policy yet has no row to lock, and
            # two first settings at once would each name none as the policy they replace.
            await self.conn.execute(_LOCK_POLICY, model)
        raw = await self.conn.fetchval("SELECT policy FROM policies WHERE model = $1", model)
        return _stored_policy(model, raw) if raw is not None else None

    async def save_policy(self, model: str, policy: DriftPolicy, actor: str) -> int:
        version = await self.conn.fetchval(
            """INSERT INTO policies (model, policy, updated_by) VALUES ($1, $2, $3)
               ON CONFLICT (model) DO UPDATE SET policy = $2, updated_by = $3, updated_at = now(),
                   version = policies.version + 1
               RETURNING version""",
            model,
            policy.model_dump(mode="json"),
            actor,
        )
        return int(version)

    async def policies(self) -> dict[str, StoredPolicy]:
        rows = await self.conn.fetch("SELECT model, policy, version FROM policies")
        found = {r["model"]: (_stored_policy(r["model"], r["policy"]), r["version"]) for r in rows}
        return {
            model: StoredPolicy(policy, version)
            for model, (policy, version) in found.items()
            if policy is not None
        }

    async def policies_fingerprint(self) -> str:
        # updated_at is the setting transaction's start: it differs between any two settings of a policy.
        fingerprint = await self.conn.fetchval(
            "SELECT md5(coalesce(string_agg(model || '@' || updated_at::text, ',' ORDER BY model), ''))"
            " FROM policies"
        )
        return str(fingerprint)

    async def window_state(self, model: str, version: int, *, lock: bool = False) -> WindowState:
        sql = "SELECT * FROM window_state WHERE model = $1 AND version = $2" + (" FOR UPDATE" if lock else "")
        r = await self.conn.fetchrow(sql, model, version)
        if r is None:
            return WindowState()
        return WindowState(
            next_seq=r["next_seq"],
            starts={int(k): int(v) for k, v in r["starts"].items()},
            consecutive={k: int(v) for k, v in r["consecutive"].items()},
            last_alert_at=r["last_alert_at"],
        )

    async def save_window_state(self, model: str, version: int, state: WindowState) -> None:
        await self.conn.execute(
            """INSERT INTO window_state (model, version, next_seq, starts, consecutive, last_alert_at)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (model, version) DO UPDATE SET next_seq = $3, starts = $4, consecutive = $5,
                   last_alert_at = $6""",
            model,
            version,
            state.next_seq,
            {str(k): v for k, v in state.starts.items()},
            state.consecutive,
            state.last_alert_at,
        )

    async def record_window(
        self, model: str, version: int, seq: int, summary: dict[str, Any], report: dict[str, Any]
    ) -> bool:
        status = await self.conn.execute(
            """INSERT INTO window_reports (model, version, seq, window_id, start_at, end_at, size,
                   drift_share, alerted, report)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING""",
            model,
            version,
            seq,
            summary["window_id"],
            summary["start"],
            summary["end"],
            summary["size"],
            summary["drift_share"],
            summary["alerted"],
            _jsonb(report),
        )
        return bool(status.endswith(" 1"))

    async def latest_reports(
        self, model: str, limit: int, *, after: ReportPosition | None = None
    ) -> list[JudgedReport]:
        # In the order of the index window_reports_paged (migration 0017): the row comparison reads a page
        # from the cursor's position on, without sorting the model's reports.
        if after is None:
            rows = await self.conn.fetch(
                """SELECT judged_at, seq, version, report FROM window_reports WHERE model = $1
                   ORDER BY judged_at DESC, seq DESC, version DESC LIMIT $2""",
                model,
                limit,
            )
        else:
            rows = await self.conn.fetch(
                """SELECT judged_at, seq, version, report FROM window_reports
                   WHERE model = $1 AND (judged_at, seq, version) < ($3, $4, $5)
                   ORDER BY judged_at DESC, seq DESC, version DESC LIMIT $2""",
                model,
                limit,
                after.judged_at,
                after.seq,
                after.version,
            )
        return [
            JudgedReport(ReportPosition(r["judged_at"], r["seq"], r["version"]), r["report"]) for r in rows
        ]

    async def window_report(self, model: str, window_id: str) -> dict[str, Any] | None:
        report: dict[str, Any] | None = await self.conn.fetchval(
            "SELECT report FROM window_reports WHERE model = $1 AND window_id = $2 ORDER BY seq DESC LIMIT 1",
            model,
            window_id,
        )
        return report

    async def prune_window_reports(
        self, model: str, judged_from: datetime, judged_before: datetime, limit: int
    ) -> tuple[int, datetime | None]:
        # Oldest first through window_reports_paged, from where the round's last batch stopped: a batch never
        # reads again the index entries of the rows the batches before it deleted (dead until VACUUM). A
        # report stays while no later one of its version exists (a higher window number judged no earlier):
        # so the newest in latest_reports' order (judged_at, seq, version) of every version, and of the model,
        # stays.
        # OFFSET 0 keeps the EXISTS a lookup per report through the primary key, and the scan stops after the
        # batch; the batch's rows are deleted by their ctid, in an array. Joined instead (EXISTS, IN),
        # Postgres read all of the model's reports, or all reports, for every batch.
        row = await self.conn.fetchrow(
            """WITH gone AS (
                   DELETE FROM window_reports r
                   WHERE r.ctid = ANY(ARRAY(
                       SELECT o.ctid FROM window_reports o
                       WHERE o.model = $1 AND o.judged_at >= $2 AND o.judged_at < $3 AND EXISTS (
                           SELECT 1 FROM window_reports n
                           WHERE n.model = o.model AND n.version = o.version AND n.seq > o.seq
                               AND n.judged_at >= o.judged_at OFFSET 0)
                       ORDER BY o.judged_at, o.seq LIMIT $4))
                   RETURNING r.version, r.seq, r.judged_at
               ), marked AS (
                   INSERT INTO window_reports_pruned (model, version, seq)
                   SELECT $1, version, max(seq) FROM gone GROUP BY version
                   ON CONFLICT (model, version)
                   DO UPDATE SET seq = greatest(window_reports_pruned.seq, excluded.seq)
               )
               SELECT count(*) AS n, max(judged_at) AS last FROM gone""",
            model,
            judged_from,
            judged_before,
            limit,
        )
        assert row is not None  # an aggregate without GROUP BY always returns a row
        return row["n"], row["last"]

    async def reports_pruned_through(self, model: str, version: int) -> int | None:
        seq: int | None = await self.conn.fetchval(
            "SELECT seq FROM window_reports_pruned WHERE model = $1 AND version = $2", model, version
        )
        return seq

    async def add_labelled(self, rows: list[LabelledRecord]) -> list[tuple[str, str]]:
        if not rows:
            return []
        # A correction replaces the label only if received later: a waiting label joined by the background
        # after a later one was joined at once (their transactions ran side by side) does not undo it.
        # xmax is 0 on a row the INSERT made, the updating transaction's on one DO UPDATE changed.
        stored = await self.conn.fetch(
            """INSERT INTO labelled (prediction_id, model, version, variant, rollout_id, predicted_at,
                   prediction, score, label, observed_at, late, inputs, received_at, outside_classes)
               SELECT pid, m, v, va, ro, pa, pr, sc, lb, ob, la, inp, coalesce(rcv, now()), oc
               FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::timestamptz[],
                   $7::jsonb[], $8::float8[], $9::jsonb[], $10::timestamptz[], $11::bool[], $12::jsonb[],
                   $13::timestamptz[], $14::bool[])
                   AS sent(pid, m, v, va, ro, pa, pr, sc, lb, ob, la, inp, rcv, oc)
               ON CONFLICT (prediction_id, model, version) DO UPDATE SET label = excluded.label,
                   observed_at = excluded.observed_at, received_at = excluded.received_at,
                   outside_classes = excluded.outside_classes
               WHERE labelled.label IS DISTINCT FROM excluded.label
                   AND labelled.received_at <= excluded.received_at
               RETURNING prediction_id, model, xmax = 0 AS inserted""",
            [r.prediction_id for r in rows],
            [r.model for r in rows],
            [r.version for r in rows],
            [r.variant for r in rows],
            [r.rollout_id for r in rows],
            [r.predicted_at for r in rows],
            [_jsonb(r.prediction) for r in rows],
            [r.score for r in rows],
            [_jsonb(r.label) for r in rows],
            [r.observed_at for r in rows],
            [r.late for r in rows],
            [_jsonb(r.inputs) for r in rows],
            [r.received_at for r in rows],
            [r.outside_classes for r in rows],
        )
        # One label corrects the rows of every version it joined (a stable prediction and its shadow's).
        return list(dict.fromkeys((r["prediction_id"], r["model"]) for r in stored if not r["inserted"]))

    async def joined_labels(self, prediction_ids: list[str], models: list[str]) -> list[JoinedLabel]:
        if not prediction_ids:
            return []
        rows = await self.conn.fetch(
            """SELECT DISTINCT ON (l.prediction_id, l.model) l.prediction_id, l.model, l.label,
                   l.observed_at, l.received_at,
                   array_agg(l.version) OVER (PARTITION BY l.prediction_id, l.model) AS versions,
                   array_agg(l.variant) OVER (PARTITION BY l.prediction_id, l.model) AS variants
               FROM labelled l JOIN unnest($1::text[], $2::text[]) AS due(prediction_id, model)
                   ON l.prediction_id = due.prediction_id AND l.model = due.model
               ORDER BY l.prediction_id, l.model, l.received_at DESC""",
            prediction_ids,
            models,
        )
        return [
            JoinedLabel(
                r["prediction_id"],
                r["model"],
                r["label"],
                r["observed_at"],
                r["received_at"],
                set(r["versions"]),
                set(r["variants"]),
            )
            for r in rows
        ]

    async def labels_joined_since(self, received_since: datetime) -> list[tuple[str, str, datetime, bool]]:
        rows = await self.conn.fetch(
            """SELECT prediction_id, model, max(received_at) AS at, bool_or(variant = 'shadow') AS shadowed
               FROM labelled WHERE received_at >= $1 GROUP BY prediction_id, model ORDER BY at""",
            received_since,
        )
        return [(r["prediction_id"], r["model"], r["at"], r["shadowed"]) for r in rows]

    async def labelled_for(self, model: str, version: int, prediction_ids: list[str]) -> dict[str, Any]:
        if not prediction_ids:
            return {}
        rows = await self.conn.fetch(
            """SELECT prediction_id, label FROM labelled
               WHERE prediction_id = ANY($1::text[]) AND model = $2 AND version = $3""",
            prediction_ids,
            model,
            version,
        )
        return {r["prediction_id"]: r["label"] for r in rows}

    async def recent_labelled(self, model: str, limit: int) -> list[LabelledRecord]:
        rows = await self.conn.fetch(
            """SELECT * FROM labelled WHERE model = $1 AND variant <> 'shadow'
               ORDER BY received_at DESC LIMIT $2""",
            model,
            limit,
        )
        return [_labelled(r) for r in rows]

    async def registered_models(self) -> list[str]:
        # A label joins only a prediction of a registered version, and only a registered version's windows
        # are judged: no other model has rows in labelled or window_reports.
        rows = await self.conn.fetch("SELECT DISTINCT model FROM model_versions ORDER BY model")
        return [r["model"] for r in rows]

    async def export_horizon(self, model: str, rows: int) -> datetime | None:
        # labelled_recent reads the model's rows newest first: the rows-th is where recent_labelled stops.
        received: datetime | None = await self.conn.fetchval(
            """SELECT received_at FROM labelled WHERE model = $1 AND variant <> 'shadow'
               ORDER BY received_at DESC OFFSET $2 LIMIT 1""",
            model,
            rows - 1,
        )
        return received

    async def prunable_labels(
        self, model: str, received_from: datetime, received_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        # In labelled_recent's order from where the round's last batch stopped: a batch never reads again the
        # index entries of the rows the batches before it deleted (dead until VACUUM), which made a first
        # round over months of rows read them all again for every batch.
        rows = await self.conn.fetch(
            f"""SELECT l.prediction_id, l.received_at FROM labelled l
               WHERE l.model = $1 AND l.received_at >= $4 AND l.received_at < $2 AND NOT EXISTS (
                   SELECT 1 FROM labelled o
                   WHERE o.prediction_id = l.prediction_id AND o.model = l.model AND ({_LABEL_NEEDED}))
               ORDER BY l.received_at LIMIT $3""",
            model,
            received_before,
            limit,
            received_from,
        )
        return [(r["prediction_id"], r["received_at"]) for r in rows]

    async def prune_labels(self, model: str, prediction_ids: list[str], received_before: datetime) -> int:
        if not prediction_ids:
            return 0
        # Every row of an id goes together or none does (the condition is the pair's), so that the labels
        # counted once per id here and in label_counts add up. Counted in the statement that deletes them, as
        # unmatched labels are (_give_up_pending): the count needs no row.
        deleted: int = await self.conn.fetchval(
            f"""WITH gone AS (
                   DELETE FROM labelled l
                   WHERE l.model = $1 AND l.prediction_id = ANY($3::text[]) AND l.received_at < $2
                       AND NOT EXISTS (
                           SELECT 1 FROM labelled o
                           WHERE o.prediction_id = l.prediction_id AND o.model = l.model
                               AND ({_LABEL_NEEDED}))
                   RETURNING l.prediction_id, l.version, l.late, l.outside_classes
               ), counted AS (
                   INSERT INTO labels_pruned (model, labelled, late)
                   SELECT $1, count(DISTINCT prediction_id), count(DISTINCT prediction_id) FILTER (WHERE late)
                   FROM gone HAVING count(*) > 0
                   ON CONFLICT (model) DO UPDATE SET labelled = labels_pruned.labelled + excluded.labelled,
                       late = labels_pruned.late + excluded.late
               ), outside AS (
                   INSERT INTO labels_outside_classes_pruned (model, version, labels)
                   SELECT $1, version, count(*) FROM gone WHERE outside_classes GROUP BY version
                   ON CONFLICT (model, version)
                   DO UPDATE SET labels = labels_outside_classes_pruned.labels + excluded.labels
               )
               SELECT count(*) FROM gone""",
            model,
            received_before,
            prediction_ids,
        )
        return deleted

    async def unscored(self, model: str, version: int, limit: int) -> list[LabelledRecord]:
        rows = await self.conn.fetch(
            """SELECT * FROM labelled WHERE model = $1 AND version = $2 AND perf_seq IS NULL
               ORDER BY received_at, prediction_id LIMIT $3""",
            model,
            version,
            limit,
        )
        return [_labelled(r) for r in rows]

    async def mark_scored(self, model: str, version: int, prediction_ids: list[str], seq: int) -> None:
        await self.conn.execute(
            """UPDATE labelled SET perf_seq = $4
               WHERE prediction_id = ANY($1::text[]) AND model = $2 AND version = $3""",
            prediction_ids,
            model,
            version,
            seq,
        )

    async def performance_state(self, model: str, version: int) -> PerformanceState:
        await self.conn.execute(
            "INSERT INTO performance_state (model, version) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            model,
            version,
        )
        r = await self.conn.fetchrow(
            "SELECT * FROM performance_state WHERE model = $1 AND version = $2 FOR UPDATE", model, version
        )
        assert r is not None
        return PerformanceState(
            r["next_seq"], dict(r["last_alerts"]), dict(r["last_metrics"]), r["degraded_streak"]
        )

    async def save_performance_state(self, model: str, version: int, state: PerformanceState) -> None:
        await self.conn.execute(
            """UPDATE performance_state
               SET next_seq = $3, last_alerts = $4, last_metrics = $5, degraded_streak = $6
               WHERE model = $1 AND version = $2""",
            model,
            version,
            state.next_seq,
            state.last_alerts,
            state.last_metrics,
            state.degraded_streak,
        )

    async def add_pending(self, labels: list[PendingLabel]) -> None:
        if not labels:
            return
        # One row per prediction and model, the poll's last label (DO UPDATE cannot touch a row the same
        # statement inserted). It replaces the label waiting for the pair and waits its own time (the
        # prediction may still come: a label corrected, or sent again, also after the first one expired).
        latest = {(p.prediction_id, p.model): p for p in labels}
        await self.conn.execute(
            """INSERT INTO pending_labels (prediction_id, model, label, observed_at)
               SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::timestamptz[])
               ON CONFLICT (prediction_id, model) DO UPDATE SET label = excluded.label,
                   observed_at = excluded.observed_at, received_at = now()""",
            [p.prediction_id for p in latest.values()],
            [p.model for p in latest.values()],
            [_jsonb(p.label) for p in latest.values()],
            [p.observed_at for p in latest.values()],
        )

    async def take_pending(self, prediction_ids: list[str], models: list[str]) -> list[PendingLabel]:
        if not prediction_ids:
            return []
        rows = await self.conn.fetch(
            """DELETE FROM pending_labels p USING unnest($1::text[], $2::text[]) AS made(prediction_id, model)
               WHERE p.prediction_id = made.prediction_id AND p.model = made.model
               RETURNING p.prediction_id, p.model, p.label, p.observed_at, p.received_at""",
            prediction_ids,
            models,
        )
        return [
            PendingLabel(r["prediction_id"], r["model"], r["label"], r["observed_at"], r["received_at"])
            for r in rows
        ]

    async def pending_labels(self) -> set[tuple[str, str]]:
        rows = await self.conn.fetch("SELECT prediction_id, model FROM pending_labels")
        return {(r["prediction_id"], r["model"]) for r in rows}

    async def expire_pending(self, received_before: datetime) -> list[tuple[str, str]]:
        return await self._give_up_pending("received_at < $1", received_before)

    async def give_up_oldest_pending(self, count: int) -> list[tuple[str, str]]:
        if count <= 0:
            return []
        # pending_labels_by_age finds the oldest.
        return await self._give_up_pending(
            "(prediction_id, model) IN (SELECT prediction_id, model FROM pending_labels ORDER BY received_at "
            "LIMIT $1)",
            count,
        )

    async def _give_up_pending(self, which: str, arg: object) -> list[tuple[str, str]]:
        """Delete the waiting labels ``which`` selects and count them as unmatched for their model.
        Counted and deleted in one statement: the count needs no row, so the table holds only the labels still
        waiting. A label given up in two transactions at once is deleted, and counted, by one."""
        rows = await self.conn.fetch(
            f"""WITH expired AS (
                   DELETE FROM pending_labels WHERE {which} RETURNING prediction_id, model
               ), counted AS (
                   INSERT INTO unmatched_labels (model, unmatched)
                   SELECT model, count(*) FROM expired GROUP BY model
                   ON CONFLICT (model)
                   DO UPDATE SET unmatched = unmatched_labels.unmatched + excluded.unmatched
               )
               SELECT prediction_id, model FROM expired""",
            arg,
        )
        return [(r["prediction_id"], r["model"]) for r in rows]

    async def labels_outside_classes(self) -> dict[tuple[str, int], int]:
        rows = await self.conn.fetch(
            """SELECT model, version, sum(n)::bigint AS n FROM (
                   SELECT model, version, count(*) AS n FROM labelled WHERE outside_classes
                   GROUP BY model, version
                   UNION ALL SELECT model, version, labels FROM labels_outside_classes_pruned
               ) counted GROUP BY model, version"""
        )
        return {(r["model"], r["version"]): r["n"] for r in rows}

    async def label_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in await self.conn.fetch(
            # Labels, not rows: a label that joined a stable prediction and its shadow's is one.
            # The labels deleted by the retention are counted in labels_pruned, once per id as here.
            """SELECT model, sum(n)::bigint AS n, sum(late)::bigint AS late FROM (
                   SELECT model, count(DISTINCT prediction_id) AS n,
                       count(DISTINCT prediction_id) FILTER (WHERE late) AS late
                   FROM labelled GROUP BY model
                   UNION ALL SELECT model, labelled, late FROM labels_pruned
               ) counted GROUP BY model"""
        ):
            out.setdefault(r["model"], {}).update(labelled=r["n"], late=r["late"])
        for r in await self.conn.fetch(
            """SELECT model, coalesce(u.unmatched, 0) AS unmatched, coalesce(w.waiting, 0) AS waiting
               FROM unmatched_labels u
               FULL JOIN (SELECT model, count(*) AS waiting FROM pending_labels GROUP BY model) w
                   USING (model)"""
        ):
            out.setdefault(r["model"], {}).update(unmatched=r["unmatched"], waiting=r["waiting"])
        return out

    async def save_step(self, step: StoredStep) -> None:
        await self.conn.execute(
            """UPDATE rollout_steps SET state = 'superseded'
               WHERE rollout_id = $1 AND step_index <> $2 AND state = 'watching'""",
            step.rollout_id,
            step.step_index,
        )
        await self.conn.execute(
            """INSERT INTO rollout_steps (rollout_id, step_index, model, stable_version, canary_version,
                   started_at, min_samples, bake_seconds, cause_id, correlation_id, actor, learned_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING""",
            step.rollout_id,
            step.step_index,
            step.model,
            step.stable_version,
            step.canary_version,
            step.started_at,
            step.min_samples,
            step.bake_seconds,
            step.cause_id,
            step.correlation_id,
            step.actor,
            step.learned_at,
        )

    async def keep_early_step(self, step: EarlyStep) -> bool:
        row = await self.conn.fetchval(
            """INSERT INTO early_steps (rollout_id, step_index, model, stable_version, canary_version,
                   started_at, cause_id, correlation_id, actor, received_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING RETURNING 1""",
            step.rollout_id,
            step.step_index,
            step.model,
            step.stable_version,
            step.canary_version,
            step.started_at,
            step.cause_id,
            step.correlation_id,
            step.actor,
            step.received_at,
        )
        return row is not None

    async def take_early_steps(self, rollout_id: str) -> list[EarlyStep]:
        rows = await self.conn.fetch("DELETE FROM early_steps WHERE rollout_id = $1 RETURNING *", rollout_id)
        return sorted(_early_steps(rows), key=lambda s: s.step_index)

    async def expire_early_steps(self, received_before: float) -> list[EarlyStep]:
        rows = await self.conn.fetch(
            "DELETE FROM early_steps WHERE received_at < $1 RETURNING *", received_before
        )
        return sorted(_early_steps(rows), key=lambda s: (s.received_at, s.rollout_id, s.step_index))

    async def expire_early_steps_beyond(self, most: int, *, keeping: EarlyStep) -> list[EarlyStep]:
        rows = await self.conn.fetch(
            """DELETE FROM early_steps e USING (
                   SELECT rollout_id, step_index FROM early_steps
                   WHERE (rollout_id, step_index) <> ($2, $3)
                   ORDER BY received_at, rollout_id, step_index
                   LIMIT greatest((SELECT count(*) FROM early_steps) - $1, 0)
               ) oldest
               WHERE e.rollout_id = oldest.rollout_id AND e.step_index = oldest.step_index
               RETURNING e.*""",
            most,
            keeping.rollout_id,
            keeping.step_index,
        )
        return sorted(_early_steps(rows), key=lambda s: (s.received_at, s.rollout_id, s.step_index))

    async def kept_steps(self) -> list[EarlyStep]:
        rows = await self.conn.fetch("SELECT * FROM early_steps ORDER BY rollout_id, step_index")
        return _early_steps(rows)

    async def remember_given_up(self, steps: list[EarlyStep], given_up_at: float) -> None:
        await self.conn.executemany(
            """INSERT INTO given_up_steps (rollout_id, step_index, model, stable_version, canary_version,
                   started_at, cause_id, correlation_id, actor, received_at, given_up_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
               ON CONFLICT (rollout_id) DO UPDATE SET
                   step_index = excluded.step_index, model = excluded.model,
                   stable_version = excluded.stable_version, canary_version = excluded.canary_version,
                   started_at = excluded.started_at, cause_id = excluded.cause_id,
                   correlation_id = excluded.correlation_id, actor = excluded.actor,
                   received_at = excluded.received_at, given_up_at = excluded.given_up_at
               WHERE excluded.step_index > given_up_steps.step_index""",
            [
                (
                    s.rollout_id,
                    s.step_index,
                    s.model,
                    s.stable_version,
                    s.canary_version,
                    s.started_at,
                    s.cause_id,
                    s.correlation_id,
                    s.actor,
                    s.received_at,
                    given_up_at,
                )
                for s in steps
            ],
        )

    async def take_given_up(self, rollout_id: str) -> EarlyStep | None:
        rows = await self.conn.fetch(
            "DELETE FROM given_up_steps WHERE rollout_id = $1 RETURNING *", rollout_id
        )
        return next(iter(_early_steps(rows)), None)

    async def given_up_steps(self) -> list[EarlyStep]:
        return _early_steps(await self.conn.fetch("SELECT * FROM given_up_steps ORDER BY rollout_id"))

    async def finish_rollout(self, rollout_id: str, outcome: str) -> None:
        await self.conn.execute(
            "INSERT INTO finished_rollouts (rollout_id, outcome) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            rollout_id,
            outcome,
        )
        await self.conn.execute(
            "UPDATE rollout_steps SET state = 'finished' WHERE rollout_id = $1 AND state = 'watching'",
            rollout_id,
        )

    async def rollout_outcome(self, rollout_id: str) -> str | None:
        outcome: str | None = await self.conn.fetchval(
            "SELECT outcome FROM finished_rollouts WHERE rollout_id = $1", rollout_id
        )
        return outcome

    async def last_step(self, rollout_id: str) -> StoredStep | None:
        rows = await self.conn.fetch(
            "SELECT * FROM rollout_steps WHERE rollout_id = $1 ORDER BY step_index DESC LIMIT 1", rollout_id
        )
        steps = _steps(rows)
        return steps[0] if steps else None

    async def watched_steps(self) -> list[StoredStep]:
        rows = await self.conn.fetch(
            "SELECT * FROM rollout_steps WHERE state = 'watching' ORDER BY started_at"
        )
        return _steps(rows)

    async def rollouts_watched(self, *, besides: str) -> int:
        # rollout_steps_watching (migration 0014) finds them among every step ever decided.
        return int(
            await self.conn.fetchval(
                "SELECT count(DISTINCT rollout_id) FROM rollout_steps WHERE state = 'watching' "
                "AND rollout_id <> $1",
                besides,
            )
        )

    async def watched_beyond(self, most: int) -> list[StoredStep]:
        # In the order watched_steps loads them (rollout_steps_watching, migration 0014), ties broken.
        rows = await self.conn.fetch(
            "SELECT * FROM rollout_steps WHERE state = 'watching' "
            "ORDER BY started_at, rollout_id, step_index OFFSET $1",
            most,
        )
        return _steps(rows)

    async def decide_step(
        self, rollout_id: str, step_index: int, verdict: str, reason: str, event_id: str
    ) -> bool:
        row = await self.conn.fetchval(
            """UPDATE rollout_steps SET state = 'decided', verdict = $3, reason = $4, event_id = $5,
                   decided_at = now()
               WHERE rollout_id = $1 AND step_index = $2 AND state = 'watching' RETURNING 1""",
            rollout_id,
            step_index,
            verdict,
            reason,
            event_id,
        )
        return row is not None

    async def labelled_outcomes(
        self, model: str, version: int, since: datetime, *, rollout_id: str | None
    ) -> list[tuple[Any, Any, float | None]]:
        # The canary side is what the rollout routed, as in memory (domain.canary_evidence): a request naming
        # the candidate's version has no rollout id, and counted, one client's calls with labels could decide
        # the accuracy comparison.
        rows = await self.conn.fetch(
            """SELECT prediction, label, score FROM labelled
               WHERE model = $1 AND version = $2 AND predicted_at >= $3
                   AND CASE WHEN $4::text IS NULL THEN variant = 'stable'
                       ELSE rollout_id = $4 AND variant IN ('canary', 'shadow') END""",
            model,
            version,
            since,
            rollout_id,
        )
        return [(r["prediction"], r["label"], r["score"]) for r in rows]

    async def labels_received_since(self, model: str, since: datetime) -> bool:
        return bool(
            await self.conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM labelled WHERE model = $1 AND received_at >= $2)", model, since
            )
        )

    async def quality_last(self, model: str, version: int, feature: str, kind: str) -> float | None:
        value = await self.conn.fetchval(
            """SELECT last_at FROM quality_state WHERE model = $1 AND version = $2 AND feature = $3
               AND kind = $4""",
            model,
            version,
            feature,
            kind,
        )
        return float(value) if value is not None else None

    async def save_quality(self, model: str, version: int, feature: str, kind: str, at: float) -> None:
        await self.conn.execute(
            """INSERT INTO quality_state (model, version, feature, kind, last_at) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (model, version, feature, kind) DO UPDATE SET last_at = $5""",
            model,
            version,
            feature,
            kind,
            at,
        )

    async def record_alert(
        self, event_id: str, model: str, version: int | None, kind: str, summary: str
    ) -> None:
        await self.conn.execute(
            "INSERT INTO alerts (event_id, model, version, kind, summary) VALUES ($1, $2, $3, $4, $5)",
            event_id,
            model,
            version,
            kind,
            summary,
        )

    async def recent_alerts(self, models: Sequence[str], per_model: int) -> dict[str, list[dict[str, Any]]]:
        # The newest of each model through alerts_latest: the newest 200 of all models, filtered, left a
        # model with a few older alerts none while another's flooded the table. Alerts written in one
        # transaction share created_at: seq, the order they were written in, breaks the tie (migration 0018).
        rows = await self.conn.fetch(
            """SELECT a.event_id, a.model, a.version, a.kind, a.summary, a.created_at
               FROM unnest($1::text[]) AS m(model)
               CROSS JOIN LATERAL (
                   SELECT * FROM alerts WHERE alerts.model = m.model
                   ORDER BY created_at DESC, seq DESC LIMIT $2
               ) AS a
               ORDER BY a.model, a.created_at DESC, a.seq DESC""",
            list(models),
            per_model,
        )
        alerts: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            alerts.setdefault(r["model"], []).append(
                {**dict(r), "created_at": r["created_at"].astimezone(UTC).isoformat()}
            )
        return alerts

    async def alerted_models(self) -> list[str]:
        # One index probe per model (alerts_latest), where DISTINCT read every alert.
        rows = await self.conn.fetch(
            """WITH RECURSIVE m AS (
                   SELECT min(model) AS model FROM alerts
                   UNION ALL SELECT (SELECT min(model) FROM alerts WHERE model > m.model) FROM m
                   WHERE m.model IS NOT NULL
               )
               SELECT model FROM m WHERE model IS NOT NULL"""
        )
        return [r["model"] for r in rows]

    async def alerts_horizon(self, model: str, keep: int) -> datetime | None:
        created: datetime | None = await self.conn.fetchval(
            "SELECT created_at FROM alerts WHERE model = $1 ORDER BY created_at DESC OFFSET $2 LIMIT 1",
            model,
            keep - 1,
        )
        return created

    async def prune_alerts(
        self, model: str, created_from: datetime, created_before: datetime, limit: int
    ) -> tuple[int, datetime | None]:
        # Oldest first through alerts_latest from where the round's last batch stopped, as window reports.
        # The batch's ids as an array: as a join (IN), the delete read every alert to match them.
        row = await self.conn.fetchrow(
            """WITH gone AS (
                   DELETE FROM alerts a WHERE a.event_id = ANY(ARRAY(
                       SELECT o.event_id FROM alerts o
                       WHERE o.model = $1 AND o.created_at >= $2 AND o.created_at < $3
                       ORDER BY o.created_at LIMIT $4))
                   RETURNING a.created_at
               )
               SELECT count(*) AS n, max(created_at) AS last FROM gone""",
            model,
            created_from,
            created_before,
            limit,
        )
        assert row is not None  # an aggregate without GROUP BY always returns a row
        return row["n"], row["last"]

    async def replay_offsets(self, topic: str) -> dict[int, int]:
        rows = await self.conn.fetch("SELECT partition, offset_ FROM replay_offsets WHERE topic = $1", topic)
        return {r["partition"]: r["offset_"] for r in rows}

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        if not offsets:
            return
        await self.conn.execute(
            """INSERT INTO replay_offsets (topic, partition, offset_)
               SELECT $1, * FROM unnest($2::int[], $3::bigint[])
               ON CONFLICT (topic, partition) DO UPDATE SET offset_ = excluded.offset_""",
            topic,
            list(offsets),
            list(offsets.values()),
        )


def _stored_policy(model: str, raw: Any) -> DriftPolicy | None:
    """A stored policy, or None (the defaults apply) when it breaks a rule added since it was set: one bad
    row must not stop the service from judging every model."""
    try:
        return DriftPolicy.model_validate(raw)
    except ValidationError as exc:
        log.error(
            "stored drift policy is no longer valid; the defaults apply until it is set again",
            model=model,
            error=" ".join(str(exc).splitlines()[:3]),
        )
        return None


def _stored_model(r: asyncpg.Record) -> StoredModel:
    return StoredModel(
        model=r["model"],
        version=r["version"],
        signature=ModelSignature.model_validate(r["signature"]),
        baseline=r["baseline"],
        profile=ArtifactRef.model_validate(r["profile"]),
    )
