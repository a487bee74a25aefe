"""The prediction log's hand-off to its producer process: a handed-over item encodes to the same
PredictionsLogged as before, a full hand-off drops and counts, every accepted item is accounted for, and the
producer never outlives serving. The producer process is real; the broker is unreachable (127.0.0.1:1)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from libs.settings import KafkaSettings
from services.serving.adapters.log_producer import ProcessPredictionLog
from services.serving.adapters.prediction_log import DROPPED, FRAME, SENT, Unpacker, encode, pack
from services.serving.domain import LogItem, read_json
from tests.unit.serving.test_prediction_log import VARIED, decode, item, validated

ROOT = Path(__file__).resolve().parents[3]
NOWHERE = KafkaSettings(bootstrap="127.0.0.1:1")


def handed_over(log_item: LogItem, unpack: Unpacker | None = None, *, body_sent: bool = False) -> LogItem:
    """The item as the producer process reads it back."""
    frame = pack(log_item, body_sent=body_sent)
    size, head = FRAME.unpack(frame[: FRAME.size])
    assert size == len(frame) - FRAME.size
    return (unpack or Unpacker())(frame[FRAME.size :], head)


def with_body(log_item: LogItem, body: bytes, rows: list[int] | None = None) -> LogItem:
    """The item as the v1 API makes it: the records are the body's, ``rows`` picks this item's."""
    records = read_json(body)["records"]
    log_item.body = body
    log_item.body_rows = rows
    log_item.raw_rows = records if rows is None else [records[i] for i in rows]
    return log_item


@pytest.mark.parametrize("case", list(VARIED))
def test_a_handed_over_item_encodes_to_the_rowwise_validated_event(case: str) -> None:
    log_item = VARIED[case]()
    [wire] = encode(handed_over(log_item), source="/s", max_bytes=1_000_000)
    assert decode(wire).data == validated(log_item)


def test_records_are_read_back_from_the_request_body_as_it_came() -> None:
    # NaN literals need Python's json (as the request did); the value is logged as null.
    body = (
        b'{"records": [{"tenure_months": NaN, "monthly_charges": 1e-300, "plan": "pr\\u00f6,\\"%s"},'
        b' {"tenure_months": 3, "monthly_charges": 12345678901234, "plan": "basic",'
        b' "extra": "not a feature"}]}'
    )
    log_item = with_body(item(rows=2), body)
    frame = pack(log_item, body_sent=False)
    assert body in frame and b"monthly_charges" not in frame.replace(body, b"")
    [wire] = encode(handed_over(log_item), source="/s", max_bytes=1_000_000)
    assert decode(wire).data == validated(log_item)
    assert decode(wire).data.rows[1].inputs["extra"] == "not a feature"


def test_the_variants_of_a_split_request_share_one_body_in_order() -> None:
    records = [{"tenure_months": i, "monthly_charges": 10.5 * i, "plan": "basic"} for i in range(5)]
    body = orjson.dumps({"records": records})
    stable, canary = with_body(item(rows=3), body, [0, 2, 4]), with_body(item(rows=2), body, [1, 3])
    unpack = Unpacker()
    first = handed_over(stable, unpack)
    assert body not in pack(canary, body_sent=True)
    second = handed_over(canary, unpack, body_sent=True)
    assert [r["tenure_months"] for r in first.raw_rows or []] == [0, 2, 4]
    assert [r["tenure_months"] for r in second.raw_rows or []] == [1, 3]
    [wire] = encode(second, source="/s", max_bytes=1_000_000)
    assert decode(wire).data == validated(canary)


def test_a_frame_reusing_a_body_never_read_is_refused() -> None:
    log_item = with_body(item(rows=2), orjson.dumps({"records": [{}, {}]}))
    with pytest.raises(ValueError, match="never read"):
        handed_over(log_item, body_sent=True)


def counts() -> dict[str, float]:
    reasons = ("buffer-full", "send-failed", "unencodable", "producer-down", "producer-exited")
    return {"sent": SENT._value.get()} | {r: DROPPED.labels(r)._value.get() for r in reasons}


def big_item() -> LogItem:
    records = [{"tenure_months": i, "monthly_charges": 0.1 * i, "plan": "basic"} for i in range(300)]
    return with_body(item(rows=300), orjson.dumps({"records": records}))


async def test_a_full_hand_off_drops_and_counts_and_every_accepted_item_is_accounted_for() -> None:
    log = ProcessPredictionLog(
        NOWHERE, source="/s", buffer=2, batch=2, linger_ms=0, handoff_bytes=64 * 1024, stop_timeout_s=1
    )
    before = counts()
    assert not log.offer(item())  # no producer yet: dropped and counted
    running = asyncio.create_task(log.run())
    await asyncio.wait_for(log.connected(), timeout=30)
    accepted = refused = 0
    until = time.monotonic() + 30
    # The producer cannot send: its queue, its socket and then the hand-off buffer fill up.
    while refused == 0 and time.monotonic() < until:
        for _ in range(20):
            if log.offer(big_item()):
                accepted += 1
            else:
                refused += 1
        await asyncio.sleep(0.01)
    assert refused > 0 and accepted > 0
    await log.stop()
    await asyncio.wait_for(running, timeout=30)
    after = counts()
    assert after["producer-down"] - before["producer-down"] == 1
    assert after["buffer-full"] - before["buffer-full"] == refused
    assert after["sent"] == before["sent"]
    lost = sum(after[r] - before[r] for r in ("send-failed", "unencodable", "producer-exited"))
    assert lost == accepted
    assert log.process is not None and log.process.returncode is not None


PARENT = textwrap.dedent(
    """
    import asyncio, datetime, sys
    import orjson
    from contracts.predictions import Variant
    from libs.settings import KafkaSettings
    from services.serving.adapters.log_producer import ProcessPredictionLog
    from services.serving.domain import FeatureColumns, LogItem, Scores

    rows = [{"x": 0.5 * i} for i in range(300)]
    item = LogItem(
        "m", 1, Variant.STABLE, None, "r", datetime.datetime.now(datetime.UTC), 1.0, ["i"] * 300,
        [None] * 300, FeatureColumns(300, {}), rows, Scores([0] * 300, None, None),
        body=orjson.dumps({"records": rows}),
    )

    async def main():
        log = ProcessPredictionLog(
            KafkaSettings(bootstrap="127.0.0.1:1"), source="/s", buffer=1, batch=1, linger_ms=0,
            handoff_bytes=1 << 20, stop_timeout_s=1,
        )
        asyncio.create_task(log.run())
        await log.connected()
        for _ in range(int(sys.argv[1])):
            log.offer(item)
        print(log.process.pid, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited; its new parent has not reaped it yet


@pytest.mark.parametrize("items", [0, 200], ids=["idle", "stuck-on-a-full-queue"])
def test_the_producer_dies_with_a_killed_serving(items: int) -> None:
    # With a full queue the producer is not reading its socket, so it never sees the EOF: the kernel's
    # parent-death signal must stop it.
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(items)], cwd=ROOT, stdout=subprocess.PIPE, env=os.environ
    )
    try:
        assert parent.stdout is not None
        producer = int(parent.stdout.readline())
        assert not gone(producer)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        killed = time.monotonic()
        while not gone(producer) and time.monotonic() < killed + 20:
            time.sleep(0.05)
        assert gone(producer), "the producer outlived serving"
        print(f"producer gone {time.monotonic() - killed:.1f} s after serving")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_producer_process_does_not_load_the_models_libraries() -> None:
    code = (
        "import sys, services.serving.adapters.log_producer; "
        "print(sorted(m for m in ('pandas', 'sklearn', 'onnxruntime', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
