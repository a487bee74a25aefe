"""The audit service's HTTP API (viewer role): events, causal traces, verification, export, checkpoints.

Every route reads the trail in the writer role, which may not change it, through the same core functions
the `driftloop audit` commands use. Traffic data (the payloads of predictions and labels, often personal
data) is for auditors: a caller without the auditor role sees those events with their payload withheld, and
may not export the trail, whose rows go out whole so that they can be re-hashed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import asyncpg
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import WithJsonSchema

from libs.auth import AuditorDep, Principal, Role, ViewerDep
from libs.errors import InvalidInput, TooManyRequests
from libs.http import FILE_SCHEMA, BodyRoute, ErrorBody, InDigits
from services.audit import core
from services.audit.adapters.files import CheckpointFile
from services.audit.adapters.postgres import PgChain, reading
from services.audit.domain import (
    EVENT_TIME_FORM,
    SEQ_MAX,
    EventQuery,
    KeyRing,
    Kind,
    Signer,
    decode_cursor,
    event_type_filter,
    time_range,
)
from services.audit.schemas import (
    AuditEventPage,
    AuditEventPublic,
    CheckpointPage,
    HeadPublic,
    SigningKeyPublic,
    TracePublic,
    VerifyPublic,
)
from services.audit.settings import AuditSettings

router = APIRouter(prefix="/v1", tags=["audit"], route_class=BodyRoute)


class Slots:
    """How many requests of one kind run at once: one more than ``limit`` is refused (429), never queued.
    Exports hold a database connection until their client has read the whole export, verifications
    ``verify_parallelism`` connections until the chain is checked; neither may take the connections the
    trail's writer needs (the API reads on the writer's pool)."""

    RETRY_AFTER_S = 5

    def __init__(self, limit: int, *, running: str, setting: str) -> None:
        self.limit = limit
        self.running = running
        self.setting = setting
        self.held = 0

    def check_free(self) -> None:
        """429 when every slot is held, as :meth:`hold` would answer now; takes none."""
        if self.held >= self.limit:
            raise TooManyRequests(
                f"{self.held} {self.running} already, the most at once "
                f"({self.setting}={self.limit}): try again in {self.RETRY_AFTER_S} s",
                retry_after_s=self.RETRY_AFTER_S,
            )

    @contextmanager
    def hold(self) -> Iterator[None]:
        self.check_free()
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1


def export_slots(limit: int) -> Slots:
    """The slots of GET /v1/export (DRIFTLOOP_AUDIT_EXPORT_CONCURRENCY)."""
    return Slots(limit, running="exports are being streamed", setting="DRIFTLOOP_AUDIT_EXPORT_CONCURRENCY")


def verify_slots(limit: int) -> Slots:
    """The slots of GET /v1/verify (DRIFTLOOP_AUDIT_VERIFY_CONCURRENCY)."""
    return Slots(limit, running="verifications are running", setting="DRIFTLOOP_AUDIT_VERIFY_CONCURRENCY")


@dataclass(frozen=True)
class AuditContext:
    """What the routes need, built once by the bootstrap."""

    settings: AuditSettings
    pool: asyncpg.Pool
    signer: Signer
    keys: KeyRing
    archive: CheckpointFile
    exports: Slots
    verifications: Slots

    @property
    def role(self) -> str:
        """The role every transaction runs as."""
        return self.settings.writer_role


EventTimeText = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
"""A time query parameter: text, read by ``time_range`` (pydantic would take a number as Unix time)."""

_TIME_FORM = f"{EVENT_TIME_FORM} (anything else is 422)"


def _context(request: Request) -> AuditContext:
    return cast(AuditContext, request.app.state.audit)


def _traffic_data(caller: Principal) -> bool:
    """Whether the caller may read traffic rows' payloads (services.audit.domain.TRAFFIC_TOPICS)."""
    return caller.grants(Role.auditor)


@router.get("/events", response_model=AuditEventPage, summary="Query the trail.")
async def list_events(
    request: Request,
    caller: ViewerDep,
    model: Annotated[str | None, Query(description="Model name (the CloudEvents subject).")] = None,
    type: Annotated[
        str | None, Query(description="Event type: `io.driftloop.DriftDetected.v1` or `DriftDetected`.")
    ] = None,
    actor: Annotated[str | None, Query(description="Who asked, e.g. `user:alice`.")] = None,
    correlation_id: Annotated[str | None, Query(description="Events of one cascade.")] = None,
    kind: Annotated[Kind | None, Query(description="event, undecodable or dead-letter.")] = None,
    since: Annotated[
        EventTimeText | None, Query(description=f"Event time at or after: {_TIME_FORM}.")
    ] = None,
    until: Annotated[EventTimeText | None, Query(description=f"Event time before: {_TIME_FORM}.")] = None,
    order: Annotated[Literal["newest", "oldest"], Query(description="Newest or oldest first.")] = "newest",
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, InDigits, Query(ge=1, description="Page size (at most query_max_limit).")] = 100,
) -> dict[str, Any]:
    """Events matching every given filter, one page at a time."""
    ctx = _context(request)
    if limit > ctx.settings.query_max_limit:
        raise InvalidInput(f"limit may be at most {ctx.settings.query_max_limit}", field="limit")
    since_utc, until_utc = time_range(since, until)
    newest_first = order == "newest"
    position = decode_cursor(cursor, newest_first=newest_first) if cursor is not None else None
    query = EventQuery(
        model=model,
        event_type=event_type_filter(type),
        actor=actor,
        correlation_id=correlation_id,
        kind=kind,
        since=since_utc,
        until=until_utc,
        newest_first=newest_first,
        after=position if position is not None and not newest_first else None,
        before=position if position is not None and newest_first else None,
        limit=limit,
    )
    async with reading(ctx.pool, ctx.role) as trail:
        events, next_cursor = await core.query_events(
            trail, query, max_bytes=ctx.settings.query_max_bytes, traffic_data=_traffic_data(caller)
        )
    return {"events": events, "next_cursor": next_cursor}


@router.get("/events/{seq}", response_model=AuditEventPublic, summary="One event by sequence number.")
async def get_event(
    request: Request, caller: ViewerDep, seq: Annotated[int, InDigits, Path(ge=1, le=SEQ_MAX)]
) -> dict[str, Any]:
    """The trail row ``seq``."""
    ctx = _context(request)
    async with reading(ctx.pool, ctx.role) as trail:
        return await core.event_at(trail, seq, traffic_data=_traffic_data(caller))


@router.get(
    "/trace/{correlation_id:path}",  # any correlation id a producer set, slashes included
    response_model=TracePublic,
    # Leaves out cause_missing and cause_cycle where they do not apply, never a field the schema requires.
    response_model_exclude_unset=True,
    summary="The causal tree of one cascade.",
)
async def get_trace(
    request: Request, caller: ViewerDep, correlation_id: Annotated[str, Path(min_length=1, max_length=512)]
) -> dict[str, Any]:
    """Every event of one correlation id as a tree of causationid links: why something happened."""
    ctx = _context(request)
    async with reading(ctx.pool, ctx.role) as trail:
        return await core.trace(
            trail,
            correlation_id,
            max_events=ctx.settings.trace_max_events,
            max_bytes=ctx.settings.trace_max_bytes,
            traffic_data=_traffic_data(caller),
        )


@router.get(
    "/verify",
    response_model=VerifyPublic,
    summary="Verify the chain and the checkpoints.",
    responses={
        429: {
            "model": ErrorBody,
            "description": "As many verifications as DRIFTLOOP_AUDIT_VERIFY_CONCURRENCY are running already: "
            "try again after the Retry-After header's seconds.",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}},
        },
    },
)
async def verify(
    request: Request,
    _: ViewerDep,
    from_seq: Annotated[
        int, InDigits, Query(ge=1, le=SEQ_MAX, description="First row (trusting the row before it).")
    ] = 1,
    to_seq: Annotated[
        int | None, InDigits, Query(ge=1, le=SEQ_MAX, description="Last row (default: the end).")
    ] = None,
    full: Annotated[
        bool, Query(description="Hash every record here and check the indexed columns too (slower).")
    ] = False,
) -> dict[str, Any] | StreamingResponse:
    """OK, or the first bad sequence number and why."""
    core.check_range(from_seq, to_seq)  # before a slot is taken: a range of no rows is 422, never 429
    ctx = _context(request)
    if request.method == "HEAD":
        # Whether the chain holds is in the body only (200 either way), and finding out reads the whole range:
        # a HEAD (a load balancer's, curl -I) is answered from the request alone, taking no slot, as the
        # export's is (docs/audit.md, How to verify).
        ctx.verifications.check_free()
        return StreamingResponse(iter(()), media_type="application/json")  # no Content-Length: 0
    with ctx.verifications.hold():
        report = await core.verify_trail(
            PgChain(ctx.pool, ctx.role),
            keys=ctx.keys,
            sealer=ctx.signer.sealer,
            archives=[ctx.archive],
            from_seq=from_seq,
            to_seq=to_seq,
            full=full,
            parallelism=ctx.settings.verify_parallelism,
        )
    return report.as_json()


@router.get(
    "/export",
    summary="The trail as NDJSON, with the signed checkpoints in place.",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-ndjson": {"schema": FILE_SCHEMA}}},
        429: {
            "model": ErrorBody,
            "description": "As many exports as DRIFTLOOP_AUDIT_EXPORT_CONCURRENCY are streaming already: try "
            "again after the Retry-After header's seconds.",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}},
        },
    },
)
async def export(
    request: Request,
    _: AuditorDep,
    from_seq: Annotated[int, InDigits, Query(ge=1, le=SEQ_MAX, description="First row.")] = 1,
    to_seq: Annotated[
        int | None, InDigits, Query(ge=1, le=SEQ_MAX, description="Last row (default: the end).")
    ] = None,
) -> StreamingResponse:
    """A header line, then one line per row and one per checkpoint (see docs/audit.md). Auditor role: the
    rows go out whole, traffic data included, as a reader re-hashes them to verify the chain."""
    core.check_range(from_seq, to_seq)  # before a slot, a connection and a snapshot are taken
    ctx = _context(request)
    if request.method == "HEAD":
        # The rest of the answer is known only from the export's first line, which takes a slot, a
        # connection and a snapshot: a HEAD is answered from the request alone (docs/audit.md, Export format).
        ctx.exports.check_free()
        return StreamingResponse(iter(()), media_type="application/x-ndjson")

    async def lines() -> AsyncGenerator[bytes, None]:
        # The slot is held as long as the connection is: released with it, however the stream ends.
        with ctx.exports.hold():
            async with reading(ctx.pool, ctx.role, snapshot=True) as trail:
                async for chunk in core.export_lines(
                    trail, from_seq=from_seq, to_seq=to_seq, archives=[ctx.archive]
                ):
                    yield chunk

    # Problems with the request are found before the first byte goes out, while a status can still say so.
    stream = lines()
    first = await anext(stream)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # a client that hangs up frees the connection at once

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.get("/checkpoints", response_model=CheckpointPage, summary="The newest signed checkpoints.")
async def list_checkpoints(
    request: Request, _: ViewerDep, limit: Annotated[int, InDigits, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """Checkpoints as published on mlops.audit, newest first."""
    ctx = _context(request)
    async with reading(ctx.pool, ctx.role) as trail:
        return {"checkpoints": await trail.checkpoints(limit=limit)}


@router.get("/keys", response_model=list[SigningKeyPublic], summary="Public keys of the checkpoints.")
async def list_keys(request: Request, _: ViewerDep) -> list[dict[str, Any]]:
    """The current signing key and retired ones still trusted. Outside verifiers should pin these."""
    ctx = _context(request)
    return [
        {
            "key_id": key_id,
            "algorithm": "ed25519",
            "public_key": public,
            "current": key_id == ctx.signer.key_id,
        }
        for key_id, public in ctx.keys.public_keys().items()
    ]


@router.get("/head", response_model=HeadPublic, summary="The end of the trail.")
async def get_head(request: Request, _: ViewerDep) -> dict[str, Any]:
    """The last row's sequence number and hash, and the newest checkpoint."""
    ctx = _context(request)
    async with reading(ctx.pool, ctx.role) as trail:
        return await core.head_view(trail)
