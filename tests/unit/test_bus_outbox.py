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
