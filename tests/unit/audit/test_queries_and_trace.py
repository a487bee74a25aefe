"""Reading the trail: pages with cursors, events shown from the hashed record, causal trees."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from contracts.commands import RollbackRequested
from contracts.envelope import CloudEvent, MissingAttribute
from contracts.models import ModelStageChanged, ModelVersionRegistered
from contracts.monitoring import DriftDetected
from contracts.rollouts import RolloutPromoted, RolloutStarted
from contracts.topics import DEAD_LETTER
from contracts.training import TrainingCompleted, TrainingRequested, TrainingStarted
from contracts.validation import ValidationPassed
from libs.bus.core import Delivery, Record
from libs.errors import InvalidInput, NotFound
from services.audit import core
from services.audit.domain import (
    SEQ_MAX,
    EventQuery,
    Kind,
    Signer,
    decode_cursor,
    encode_cursor,
    event_type_filter,
    time_range,
)
from services.audit.schemas import AuditEventPublic, TracePublic
from tests.unit.audit.fakes import (
    PAGE_BYTES,
    SEED,
    TRACE_BYTES,
    Clock,
    FakeTrail,
    dead_letters_of,
    delivery,
    example,
    record,
    small_and_large,
)


async def store(trail: FakeTrail, deliveries: list[Delivery]) -> None:
    await record(trail, Signer(SEED), deliveries)


def cascade() -> list[CloudEvent[Any]]:
    """Drift -> retrain -> ... -> promotion, each event caused by the one before."""
    chain = [example(DriftDetected)]
    for cls in (
        TrainingRequested,
        TrainingStarted,
        TrainingCompleted,
        ModelVersionRegistered,
        ValidationPassed,
        RolloutStarted,
        RolloutPromoted,
        ModelStageChanged,
    ):
        chain.append(example(cls, cause=chain[-1]))
    return chain


@pytest.fixture
async def trail() -> FakeTrail:
    trail = FakeTrail()
    events = cascade()
    unrelated = example(RollbackRequested, actor="user:alice")
    completed = events[3]
    key, value, headers = completed.to_kafka()
    dead = Record(DEAD_LETTER, 0, 0, key, value, (*headers, ("dlq_reason", b"handler-failed")))
    deliveries = [delivery(e, offset=i) for i, e in enumerate(events)]
    deliveries.insert(5, delivery(unrelated, offset=100))
    deliveries.append(Delivery(dead, completed))
    await store(trail, deliveries)
    return trail


async def test_pages_follow_the_cursor_newest_first_without_overlap(trail: FakeTrail) -> None:
    seen: list[int] = []
    cursor: str | None = None
    while True:
        before = decode_cursor(cursor, newest_first=True) if cursor else None
        page, cursor = await core.query_events(
            trail, EventQuery(limit=4, before=before), max_bytes=PAGE_BYTES
        )
        seen += [e["seq"] for e in page]
        if cursor is None:
            break
    assert seen == list(range(11, 0, -1))


PAGE_SIZES = [0, 300_000, 0, 0, 300_000, 300_000, 300_000, 0, 1_500_000, 0, 300_000, 300_000, 0, 0, 0, 0, 0]
"""Small events and large dead letters, one of them past a page's budget by itself."""


async def page_through(
    trail: FakeTrail, *, newest_first: bool, limit: int, max_bytes: int, **filters: Any
) -> list[list[dict[str, Any]]]:
    """Every page of a query, following each page's cursor as GET /v1/events does."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        at = decode_cursor(cursor, newest_first=newest_first) if cursor else None
        query = EventQuery(
            newest_first=newest_first,
            after=None if newest_first else at,
            before=at if newest_first else None,
            limit=limit,
            **filters,
        )
        page, cursor = await core.query_events(trail, query, max_bytes=max_bytes)
        pages.append(page)
        if cursor is None:
            return pages


@pytest.mark.parametrize("newest_first", [True, False], ids=["newest", "oldest"])
async def test_pages_of_large_records_end_at_the_byte_budget_and_every_row_comes_once(
    newest_first: bool,
) -> None:
    trail = FakeTrail()
    await store(trail, small_and_large(PAGE_SIZES))
    size = {s.row.seq: len(s.row.record or b"") for s in trail.rows.values()}
    budget, limit = 1_000_000, 5

    pages = await page_through(trail, newest_first=newest_first, limit=limit, max_bytes=budget)

    seen = [e["seq"] for page in pages for e in page]
    assert seen == sorted(size, reverse=newest_first)  # none lost, none twice, in order
    for page in pages:
        held = [size[e["seq"]] for e in page]
        # Taken while the records before a row hold less than the budget: the budget and one record at most.
        assert 1 <= len(page) <= limit and sum(held[:-1]) < budget
    assert any(len(page) < limit for page in pages[:-1])  # the bytes ended some pages early
    # A record past the budget by itself is still shown, and ends its page.
    [big] = [seq for seq, n in size.items() if n > budget]
    assert [page[-1]["seq"] for page in pages if big in (e["seq"] for e in page)] == [big]


async def test_filters_by_model_type_and_actor(trail: FakeTrail) -> None:
    events, _ = await core.query_events(trail, EventQuery(actor="user:alice"), max_bytes=PAGE_BYTES)
    assert [e["type"] for e in events] == ["io.driftloop.RollbackRequested.v1"]
    assert events[0]["data"]["model"] == "churn"
    events, _ = await core.query_events(
        trail,
        EventQuery(event_type=event_type_filter("RolloutPromoted"), model="churn"),
        max_bytes=PAGE_BYTES,
    )
    assert [e["type"] for e in events] == ["io.driftloop.RolloutPromoted.v1"]
    dead, _ = await core.query_events(trail, EventQuery(kind=Kind.DEAD_LETTER), max_bytes=PAGE_BYTES)
    assert [e["error"] for e in dead] == [{"reason": "handler-failed", "detail": ""}]


async def test_event_fields_come_from_the_hashed_record_and_a_doctored_index_is_flagged(
    trail: FakeTrail,
) -> None:
    row = trail.rows[1].row
    trail.rows[1].row = replace(row, attributes=row.attributes._replace(actor="user:mallory"))
    [event], _ = await core.query_events(trail, EventQuery(actor="user:mallory"), max_bytes=PAGE_BYTES)
    assert event["actor"] is None
    assert event["integrity"] == "indexed column actor does not match the hashed record"


async def test_a_row_drawn_into_a_trace_by_a_doctored_index_is_flagged(trail: FakeTrail) -> None:
    root_id = trail.rows[1].row.attributes.correlation_id
    stranger = next(s.row for s in trail.rows.values() if s.row.attributes.actor == "user:alice")
    trail.rows[stranger.seq].row = replace(
        stranger, attributes=stranger.attributes._replace(correlation_id=root_id)
    )
    assert root_id is not None
    tree = await core.trace(trail, root_id, max_events=100, max_bytes=TRACE_BYTES)
    [shown] = [r for r in tree["roots"] if r["seq"] == stranger.seq]
    assert shown["correlationid"] != root_id  # from the record ...
    assert (
        shown["integrity"] == "indexed column correlation_id does not match the hashed record"
    )  # ... flagged
    assert all("integrity" not in r for r in tree["roots"] if r["seq"] != stranger.seq)
    one = await core.event_at(trail, stranger.seq)
    assert one["integrity"] == "indexed column correlation_id does not match the hashed record"
    TracePublic.model_validate(tree)


async def test_integers_beyond_64_bits_are_shown_as_the_trail_holds_them() -> None:
    trail = FakeTrail()
    value = (
        b'{"big": 18446744073709551616, "u64": 18446744073709551615, "low": -9223372036854775809,'
        b' "digits": "123456789012345678901234", "f": 0.1, "deep": [[[-123456789012345678901234567890]]]}'
    )
    await store(trail, [Delivery(Record("team.things", 0, 0, None, value, ()), None)])

    event = await core.event_at(trail, 1)

    assert event["data"] == {
        "big": 2**64,
        "u64": 2**64 - 1,
        "low": -(2**63) - 1,
        "digits": "123456789012345678901234",
        "f": 0.1,
        "deep": [[[-123456789012345678901234567890]]],
    }
    assert type(event["data"]["big"]) is int and type(event["data"]["low"]) is int
    assert '"big":18446744073709551616' in AuditEventPublic.model_validate(event).model_dump_json()


async def test_trace_is_the_causal_tree_from_drift_to_promotion(trail: FakeTrail) -> None:
    root_id = trail.rows[1].row.attributes.event_id
    assert root_id is not None
    tree = await core.trace(trail, root_id, max_events=100, max_bytes=TRACE_BYTES)
    assert tree["events"] == 9 and not tree["truncated"]
    [root] = tree["roots"]
    chain = []
    node = root
    while True:
        chain.append(node["type"].split(".")[2])
        if not node["children"]:
            break
        [node] = node["children"]
    assert chain == [type(e.data).__name__ for e in cascade()]
    completed = root["children"][0]["children"][0]["children"][0]
    assert completed["type"] == "io.driftloop.TrainingCompleted.v1"
    assert [d["kind"] for d in completed["dead_letters"]] == ["dead-letter"]


async def test_trace_cut_at_the_limit_says_so(trail: FakeTrail) -> None:
    root_id = trail.rows[1].row.attributes.event_id
    assert root_id is not None
    tree = await core.trace(trail, root_id, max_events=3, max_bytes=TRACE_BYTES)
    assert tree["truncated"] and tree["events"] == 3
    assert tree["truncated_by"] == "trace_max_events"
    assert "more than 3 events (DRIFTLOOP_AUDIT_TRACE_MAX_EVENTS)" in tree["truncated_reason"]


async def large_dead_letters(trail: FakeTrail, *, count: int, size: int) -> str:
    """An event and ``count`` large dead letters of it in the trail; the cascade's correlation id."""
    drift = example(DriftDetected)
    await store(trail, [delivery(drift), *dead_letters_of(drift, count=count, size=size)])
    return str(drift.id)


async def test_trace_of_large_records_stops_at_the_byte_budget_and_says_which_bound_cut_it() -> None:
    trail = FakeTrail()
    correlation_id = await large_dead_letters(trail, count=30, size=100_000)
    sizes = [len(s.row.record or b"") for s in sorted(trail.rows.values(), key=lambda s: s.row.seq)]
    budget = 1_000_000
    # Rows are taken while the records before them hold less than the budget: the last one passes it.
    taken = next(n for n in range(1, len(sizes) + 1) if sum(sizes[:n]) >= budget)
    assert taken < len(sizes)

    tree = await core.trace(trail, correlation_id, max_events=10_000, max_bytes=budget)

    [root] = tree["roots"]
    assert 1 + len(root["dead_letters"]) == taken
    assert tree["truncated"] and tree["truncated_by"] == "trace_max_bytes"
    assert (
        f"up to seq {taken} reached {budget} bytes (DRIFTLOOP_AUDIT_TRACE_MAX_BYTES)"
        in (tree["truncated_reason"])
    )
    assert TracePublic.model_validate(tree).truncated_by == "trace_max_bytes"


async def test_a_cascade_that_ends_where_the_byte_budget_does_is_whole_and_one_past_any_budget_is_shown() -> (
    None
):
    trail = FakeTrail()
    correlation_id = await large_dead_letters(trail, count=3, size=10_000)
    total = sum(len(s.row.record or b"") for s in trail.rows.values())

    whole = await core.trace(trail, correlation_id, max_events=100, max_bytes=total)
    assert len(whole["roots"][0]["dead_letters"]) == 3
    assert (whole["truncated"], whole["truncated_by"], whole["truncated_reason"]) == (False, None, None)

    # A budget below the first record still shows that record: a trace is never empty for its size.
    first = await core.trace(trail, correlation_id, max_events=100, max_bytes=1)
    assert first["events"] == 1 and first["roots"][0]["dead_letters"] == []
    assert first["truncated_by"] == "trace_max_bytes"


async def test_trace_of_an_unknown_cascade_is_404(trail: FakeTrail) -> None:
    with pytest.raises(NotFound):
        await core.trace(trail, "nope", max_events=10, max_bytes=TRACE_BYTES)


async def test_event_whose_cause_is_missing_becomes_a_root() -> None:
    trail = FakeTrail()
    events = cascade()
    await store(trail, [delivery(e, offset=i) for i, e in enumerate(events) if i != 2])
    tree = await core.trace(trail, events[0].id, max_events=100, max_bytes=TRACE_BYTES)
    assert [r["type"].split(".")[2] for r in tree["roots"]] == ["DriftDetected", "TrainingCompleted"]
    assert tree["roots"][1]["cause_missing"] == events[2].id


def tree_seqs(nodes: list[dict[str, Any]]) -> list[int]:
    out: list[int] = []
    for node in nodes:
        out += [node["seq"], *tree_seqs(node["children"])]
    return out


async def test_a_loop_of_causes_is_cut_at_its_earliest_event_and_nothing_goes_missing() -> None:
    a, b = example(DriftDetected), example(TrainingRequested)
    # A claims to be caused by B and B by A, in one cascade; C, caused by B, hangs off the loop.
    a = a.model_copy(update={"causationid": b.id, "correlationid": "loop"})
    b = b.model_copy(update={"causationid": a.id, "correlationid": "loop"})
    c = example(TrainingStarted, cause=b).model_copy(update={"correlationid": "loop"})
    trail = FakeTrail()
    await store(trail, [delivery(e, offset=i) for i, e in enumerate((a, b, c))])
    tree = await core.trace(trail, "loop", max_events=100, max_bytes=TRACE_BYTES)
    TracePublic.model_validate(tree)
    [root] = tree["roots"]
    assert (root["id"], root["cause_cycle"]) == (a.id, b.id)
    assert "cause_missing" not in root
    assert [n["id"] for n in root["children"]] == [b.id]
    assert [n["id"] for n in root["children"][0]["children"]] == [c.id]
    assert sorted(tree_seqs(tree["roots"])) == [1, 2, 3] and tree["events"] == 3


async def test_an_event_caused_by_itself_is_a_root_flagged_as_a_loop() -> None:
    event = example(DriftDetected)
    event = event.model_copy(update={"causationid": event.id})
    child = example(TrainingRequested, cause=event)
    trail = FakeTrail()
    await store(trail, [delivery(event, offset=0), delivery(child, offset=1)])
    tree = await core.trace(trail, event.id, max_events=100, max_bytes=TRACE_BYTES)
    TracePublic.model_validate(tree)
    [root] = tree["roots"]
    assert root["cause_cycle"] == event.id and "cause_missing" not in root
    assert [n["id"] for n in root["children"]] == [child.id]


async def test_very_deep_cascade_comes_back_flat() -> None:
    trail = FakeTrail()
    chain = [example(DriftDetected)]
    for _ in range(120):
        chain.append(example(TrainingStarted, cause=chain[-1]))
    await store(trail, [delivery(e, offset=i) for i, e in enumerate(chain)])
    tree = await core.trace(trail, chain[0].id, max_events=1000, max_bytes=TRACE_BYTES)
    assert "roots" not in tree
    assert [n["parent"] for n in tree["flat"][:2]] == [None, chain[0].id]


async def test_a_flat_cascade_whose_first_cause_is_missing_fits_the_response_schema() -> None:
    trail = FakeTrail()
    chain = [example(DriftDetected, cause=example(TrainingCompleted))]
    for _ in range(120):
        chain.append(example(TrainingStarted, cause=chain[-1]))
    await store(trail, [delivery(e, offset=i) for i, e in enumerate(chain)])
    tree = await core.trace(trail, chain[0].correlationid, max_events=1000, max_bytes=TRACE_BYTES)
    assert tree["flat"][0]["cause_missing"] == chain[0].causationid
    assert tree["flat"][0]["parent"] is None
    TracePublic.model_validate(tree)


def test_cursor_belongs_to_its_order() -> None:
    assert decode_cursor(encode_cursor(True, 42), newest_first=True) == 42
    assert decode_cursor(encode_cursor(False, SEQ_MAX), newest_first=False) == SEQ_MAX
    with pytest.raises(InvalidInput, match="other sort order"):
        decode_cursor(encode_cursor(True, 42), newest_first=False)
    with pytest.raises(InvalidInput):
        decode_cursor("!!!", newest_first=True)


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        b64(f"d{SEQ_MAX + 1}"),  # beyond bigint: asyncpg could not encode it
        b64("d" + "9" * 30),
        b64("d0"),
        b64("d-5"),  # negative: not valid, whichever order
        b64("a-5"),
        b64("d1_0"),  # int() takes underscores, spaces and signs; a cursor has none
        b64("d 5"),
        b64("d+5"),
        b64("d05"),
        b64("x5"),
        "!!!" + b64("d5") + "!!!",  # characters outside the alphabet are not skipped
        b64("d5") + "==",
        "é",
        "",
    ],
)
def test_a_cursor_not_made_by_the_list_is_not_valid(cursor: str) -> None:
    with pytest.raises(InvalidInput, match="cursor is not valid") as caught:
        decode_cursor(cursor, newest_first=True)
    assert caught.value.extra == {"field": "cursor"}


def test_time_range_is_utc_and_refuses_what_a_query_cannot_mean() -> None:
    since, until = time_range("2025-01-01T05:00:00+05:00", None)
    assert since == datetime(2025, 1, 1, tzinfo=UTC) and since.tzinfo is UTC and until is None
    assert time_range(None, None) == (None, None)
    cases = [
        (("2025-01-01T00:00:00", None), "since needs a time zone"),
        ((None, "2025-01-01T00:00:00"), "until needs a time zone"),
        (("0001-01-01T00:00:00+05:00", None), "since: time out of range"),
        ((None, "9999-12-31T23:00:00-05:00"), "until: time out of range"),
        (("2026-01-01T00:00:00Z", "2020-01-01T00:00:00Z"), "until must not be before since"),
    ]
    for (since_, until_), message in cases:
        with pytest.raises(InvalidInput, match=message):
            time_range(since_, until_)


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("2025-01-01T00:00:00Z", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01t00:00:00z", datetime(2025, 1, 1, tzinfo=UTC)),  # RFC 3339 allows lower case
        ("2025-01-01 00:00:00Z", datetime(2025, 1, 1, tzinfo=UTC)),  # and a space
        ("2025-01-01T01:00+01:00", datetime(2025, 1, 1, tzinfo=UTC)),  # ISO 8601 lets seconds out
        ("2025-01-01T01:00:00+0100", datetime(2025, 1, 1, tzinfo=UTC)),
        ("2025-01-01T00:00:00.123456789Z", datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)),
        ("2025-01-01T00:00:00,5-00:00", datetime(2025, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_a_time_in_iso_8601_with_its_zone_is_read(text: str, meant: datetime) -> None:
    assert time_range(text, text) == (meant, meant)


async def test_an_export_whose_range_is_reversed_is_refused(trail: FakeTrail) -> None:
    with pytest.raises(InvalidInput, match="to_seq must not be below from_seq"):
        [line async for line in core.export_lines(trail, from_seq=5, to_seq=3)]


async def test_export_interleaves_checkpoints_after_their_row() -> None:
    trail = FakeTrail()
    await store(trail, [delivery(example(DriftDetected), offset=i) for i in range(5)])
    signer = Signer(SEED)
    head = await trail.head()
    await trail.add_checkpoint(signer.checkpoint(head, signed_at=Clock()()), "e")
    lines = [line async for chunk in core.export_lines(trail) for line in chunk.splitlines()]
    assert b'"format":"driftloop-audit-export/1"' in lines[0]
    assert [b'"checkpoint"' in line for line in lines[1:]] == [False] * 5 + [True]


async def test_a_page_with_no_rows_has_no_next_cursor(trail: FakeTrail) -> None:
    assert await core.query_events(trail, EventQuery(limit=0), max_bytes=PAGE_BYTES) == ([], None)


async def test_an_event_recorded_before_the_loop_it_hangs_off_keeps_its_cause() -> None:
    a, b = example(DriftDetected), example(TrainingRequested)
    a = a.model_copy(update={"causationid": b.id, "correlationid": "loop"})
    b = b.model_copy(update={"causationid": a.id, "correlationid": "loop"})
    c = example(TrainingStarted, cause=a).model_copy(update={"correlationid": "loop"})
    trail = FakeTrail()
    # C (caused by A) arrives first, from another partition; then the loop A <-> B.
    await store(trail, [delivery(c, partition=1, offset=0), delivery(a, offset=0), delivery(b, offset=1)])
    tree = await core.trace(trail, "loop", max_events=100, max_bytes=TRACE_BYTES)
    [root] = tree["roots"]  # one cut, at the loop's earliest event, A
    assert (root["id"], root["cause_cycle"]) == (a.id, b.id)
    assert sorted(n["id"] for n in root["children"]) == sorted([b.id, c.id])
    assert all("cause_cycle" not in n for n in root["children"])


async def test_a_flat_cascade_keeps_the_dead_letters_of_its_events() -> None:
    trail = FakeTrail()
    chain = [example(DriftDetected)]
    for _ in range(120):
        chain.append(example(TrainingStarted, cause=chain[-1]))
    failed = chain[60]
    key, value, headers = failed.to_kafka()
    dead = Record(DEAD_LETTER, 0, 0, key, value, (*headers, ("dlq_reason", b"handler-failed")))
    await store(trail, [*(delivery(e, offset=i) for i, e in enumerate(chain)), Delivery(dead, failed)])
    tree = await core.trace(trail, chain[0].id, max_events=1000, max_bytes=TRACE_BYTES)
    assert "roots" not in tree and tree["dead_letters"] == []
    [carrier] = [n for n in tree["flat"] if n["id"] == failed.id]
    assert [d["kind"] for d in carrier["dead_letters"]] == ["dead-letter"]
    assert carrier["dead_letters"][0]["error"]["reason"] == "handler-failed"
    TracePublic.model_validate(tree)


async def test_a_filter_longer_than_the_index_holds_is_refused_and_its_first_characters_find_the_record() -> (
    None
):
    # Only an undecodable record has an attribute over 512 characters (the envelope refuses them); its
    # indexed copy holds the first 512, so a query by the whole value could never match: it said "none".
    long_id, long_model = "c" * 600, "m" * 513
    headers = (
        ("ce_id", long_id.encode()),
        ("ce_correlationid", long_id.encode()),
        ("ce_subject", long_model.encode()),
    )
    record = Record("mlops.models", 0, 0, b"k", b"{}", headers, 1)
    trail = FakeTrail()
    await store(trail, [Delivery(record, None, MissingAttribute("ce_type is missing"))])
    for make, named in (
        (lambda: EventQuery(correlation_id=long_id), "correlation_id"),
        (lambda: EventQuery(model=long_model), "model"),
        (lambda: EventQuery(actor=long_id), "actor"),
        (lambda: EventQuery(event_type=long_id), "type"),
    ):
        with pytest.raises(
            InvalidInput, match=f"^{named} is longer than 512 characters: .* query by its first 512"
        ):
            make()
    with pytest.raises(InvalidInput, match=r"^correlation_id is longer than 512 characters"):
        await core.trace(trail, long_id, max_events=10, max_bytes=TRACE_BYTES)
    [event], _ = await core.query_events(
        trail, EventQuery(correlation_id=long_id[:512], model=long_model[:512]), max_bytes=PAGE_BYTES
    )
    assert (event["correlationid"], event["subject"]) == (long_id, long_model)
    assert (await core.trace(trail, long_id[:512], max_events=10, max_bytes=TRACE_BYTES))["events"] == 1


async def test_export_of_a_range_carries_no_checkpoint_beyond_its_to_seq() -> None:
    # Checkpoints beyond the trail's end follow the last row (a cut tail); beyond an asked to_seq, none.
    trail = FakeTrail()
    await store(trail, [delivery(example(DriftDetected), offset=i) for i in range(5)])
    signer = Signer(SEED)
    await trail.add_checkpoint(signer.checkpoint(await trail.head(), signed_at=Clock()()), "e")
    ranged = [line async for chunk in core.export_lines(trail, to_seq=4) for line in chunk.splitlines()]
    assert len(ranged) == 5 and not any(b'"checkpoint"' in line for line in ranged)
    trail.delete(4, 5)
    whole = [line async for chunk in core.export_lines(trail) for line in chunk.splitlines()]
    assert [b'"checkpoint"' in line for line in whole[1:]] == [False] * 3 + [True]
