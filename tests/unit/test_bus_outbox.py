"""A handler transaction's outbox: what it publishes is written together, before the commit."""

from __future__ import annotations

from libs.bus.postgres import PgTransaction
from tests.unit.bus_fakes import RecordingConn
from tests.unit.test_bus import thing


async def test_events_published_in_a_transaction_are_written_in_one_statement_in_order() -> None:
    # A feedback request of 500 labels made 500 INSERTs one after the other (~0.4 s on an idle host), and the
    # demo's labels fell behind by 25 s: canary verdicts were given before any label had arrived.
    conn = RecordingConn()
    tx = PgTransaction(conn, "serving")
    events = [thing(n) for n in range(500)]
    for event in events:
        await tx.publish(event)
    assert conn.statements == []  # nothing written while the handler works

    await tx.flush()

    [statement] = conn.statements  # the rows and the relay's NOTIFY
    assert "INSERT INTO outbox" in statement and "pg_notify" in statement
    [(event_ids, *_)] = conn.arguments
    assert event_ids == [e.id for e in events]

    await tx.flush()  # nothing new: nothing written
    assert len(conn.statements) == 1


async def test_a_transaction_past_the_statement_budget_is_written_in_several_statements_in_order() -> None:
    # All rows in one statement: past Postgres' 1 GB message limit the server closed the connection, which
    # the bus read as the database being away and retried for ever.
    conn = RecordingConn()
    tx = PgTransaction(conn, "serving", max_statement_bytes=5_000)
    events = [thing(n) for n in range(40)]
    for event in events:
        await tx.publish(event)

    await tx.flush()

    assert len(conn.statements) > 1
    written: list[str] = []
    for event_ids, _topics, keys, values, headers, channel in conn.arguments:
        size = sum(len(k or b"") + len(v) + len(h) for k, v, h in zip(keys, values, headers, strict=True))
        assert size <= 5_000 and channel == "driftloop_outbox_serving"
        written += event_ids
    assert written == [e.id for e in events]


async def test_a_row_larger_than_the_statement_budget_is_written_alone() -> None:
    conn = RecordingConn()
    tx = PgTransaction(conn, "serving", max_statement_bytes=10)
    for n in range(3):
        await tx.publish(thing(n))

    await tx.flush()

    assert [len(event_ids) for event_ids, *_ in conn.arguments] == [1, 1, 1]
