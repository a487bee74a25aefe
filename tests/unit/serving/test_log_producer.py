"""The prediction log's hand-off to its producer process: a handed-over item encodes to the same
PredictionsLogged as before, a full hand-off drops and counts, every accepted item is accounted for, and the
producer never outlives serving. The producer process is real; the broker is unreachable (127.0.0.1:1)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from contracts.predictions import PredictionColumns, read_prediction_columns, read_predictions_logged
from libs.settings import KafkaSettings
from services.serving.adapters import prediction_log
from services.serving.adapters.log_producer import _REPORT_S, ProcessPredictionLog, restart_delay
from services.serving.adapters.prediction_log import (
    COLUMNWISE_FROM_ROWS,
    DROPPED,
    FRAME,
    SENT,
    Unpacker,
    encode,
    pack,
    record_texts,
)
from services.serving.domain import LogItem, Scores, parse_json, read_json, rows_of
from tests.unit.serving.test_prediction_log import VARIED, decode, dict_per_row, item, one_row_over, validated
from tests.waiting import eventually

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
    parsed, strict = parse_json(body)
    records = parsed["records"]
    log_item.body = body
    log_item.body_rows = rows
    log_item.body_records = len(records) if strict and len(parsed) == 1 else None
    log_item.raw_rows = records if rows is None else [records[i] for i in rows]
    return log_item


def inputs(log_item: LogItem) -> list[dict[str, Any]]:
    """The records of an item read back, whether they were cut out of the body or read from it."""
    if log_item.record_texts is not None:
        return [orjson.loads(b"{" + text + b"}") for text in log_item.record_texts]
    return log_item.raw_rows or []


@pytest.mark.parametrize("case", list(VARIED))
def test_a_handed_over_item_encodes_to_the_rowwise_validated_event(case: str) -> None:
    log_item = VARIED[case]()
    [wire] = encode(handed_over(log_item), source="/s", max_bytes=1_000_000)
    assert decode(wire).data == validated(log_item)


def as_scored(log_item: LogItem, dtype: str, rows: list[int] | None = None) -> LogItem:
    """The item as serving offers it: the model's probabilities and labels as arrays too (``tolist`` of the
    array gives the probabilities), the prediction ids as a prefix and the request's rows."""
    scores = log_item.scores
    assert scores.probabilities is not None and scores.classes is not None
    array = np.asarray(scores.probabilities, dtype=dtype)
    index = np.asarray([scores.classes.index(label) for label in scores.labels])
    log_item.scores = Scores(scores.labels, array.tolist(), scores.classes, array=array, label_index=index)
    numbers = rows if rows is not None else range(len(scores.labels))
    log_item.id_prefix = "churn:7:tok-"
    log_item.prediction_ids = [f"churn:7:tok-{i}" for i in numbers]
    log_item.body_rows = rows
    return log_item


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", [c for c in VARIED if "regression" not in c])
def test_outputs_handed_over_as_arrays_read_back_as_the_same_event(
    case: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", 1)  # arrays even for one row
    log_item = as_scored(VARIED[case](), dtype)
    frame = pack(log_item, body_sent=False)
    assert b"probabilities" not in frame and log_item.prediction_ids[0].encode() not in frame

    read = handed_over(log_item)

    assert read.scores == log_item.scores and read.prediction_ids == log_item.prediction_ids
    assert read.entity_keys == log_item.entity_keys
    [wire] = encode(read, source="/s", max_bytes=1_000_000)
    assert wire[2] == encode(log_item, source="/s", max_bytes=1_000_000)[0][2]
    assert decode(wire).data == validated(log_item)


def test_the_ids_of_a_split_request_read_back_with_their_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"tenure_months": i, "monthly_charges": 10.5 * i, "plan": "basic"} for i in range(5)]
    body = orjson.dumps({"records": records})
    canary = as_scored(with_body(item(rows=2), body, [1, 3]), "float32", [1, 3])
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", 1)
    canary.entity_keys = [None, None]

    read = handed_over(canary)

    assert read.prediction_ids == ["churn:7:tok-1", "churn:7:tok-3"] and read.entity_keys == [None, None]
    assert [r["tenure_months"] for r in inputs(read)] == [1, 3]


def test_small_items_go_as_lists_and_read_back_as_the_same_event() -> None:
    log_item = as_scored(item(rows=COLUMNWISE_FROM_ROWS - 1), "float32")

    frame = pack(log_item, body_sent=False)

    assert b"probabilities" in frame and log_item.prediction_ids[0].encode() in frame
    read = handed_over(log_item)
    assert read.scores == log_item.scores and read.prediction_ids == log_item.prediction_ids
    [wire] = encode(read, source="/s", max_bytes=1_000_000)
    assert decode(wire).data == validated(log_item)


def test_a_frame_whose_arrays_do_not_match_its_rows_is_refused() -> None:
    log_item = as_scored(item(rows=COLUMNWISE_FROM_ROWS), "float64")
    log_item.prediction_ids.append(f"churn:7:tok-{COLUMNWISE_FROM_ROWS}")
    with pytest.raises(ValueError, match=f"for {COLUMNWISE_FROM_ROWS + 1} rows"):
        handed_over(log_item)


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
    assert [r["tenure_months"] for r in inputs(first)] == [0, 2, 4]
    assert [r["tenure_months"] for r in inputs(second)] == [1, 3]
    [wire] = encode(second, source="/s", max_bytes=1_000_000)
    assert decode(wire).data == validated(canary)


@pytest.mark.parametrize("case", [c for c in VARIED if "raw records" not in c])
def test_records_cut_from_a_body_orjson_wrote_give_the_bytes_of_records_read_from_it(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", 1)  # cut even the one-row body
    log_item = VARIED[case]()
    if log_item.raw_rows is None:
        log_item.raw_rows = [dict(r) for r in rows_of(log_item.columns)]
    with_body(log_item, orjson.dumps({"records": log_item.raw_rows}))
    back = handed_over(log_item)
    assert back.record_texts is not None and back.raw_rows is None, "the records were read, not cut"
    [(_, _, value, _)] = encode(back, source="/s", max_bytes=1_000_000)
    assert value == dict_per_row(log_item)


FORMATS = {
    "compact": lambda body: json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
    "Python's json": lambda body: json.dumps(body, ensure_ascii=False).encode(),
    "indented": lambda body: json.dumps(body, indent=2, ensure_ascii=False).encode(),
    "tabs, CRLF and space around": lambda body: (
        b" \r\n" + json.dumps(body, indent="\t", ensure_ascii=False).replace("\n", "\r\n").encode() + b"\n\t "
    ),
}
TRICKY = [
    "plain",
    "},{",
    "}, {",
    "} ,\n{",
    '"records"',
    "[{",
    "}]}",
    "a\\b",
    "\u00f6",
    "\n",
    "",
    " ",
    ",",
    "12345678901234567890123",
]


def random_records(rng: random.Random, n: int) -> list[dict[str, Any]]:
    def value() -> Any:
        kind = rng.randrange(40)
        if kind == 0:
            return rng.choice(TRICKY)
        if kind == 1:
            return rng.choice([{"x": {"y": 1}}, [{"a": 1}, {"b": 2}], [], {}])  # nested: logged as they are
        if kind == 2:
            return rng.choice([10**19, -(2**63), 2**64 - 1, 10**25])
        if kind < 8:
            return rng.choice([None, True, False, "basic", "pro plan", "ö"])
        if kind < 16:
            return rng.randrange(-(10**6), 10**6)
        return rng.uniform(-1e6, 1e6) * 10 ** rng.randrange(-30, 30)

    keys = ["tenure_months", "monthly_charges", "plan", "age", "ö", "with space"]
    tricky = ["records", "a,b", "}, {"]
    return [
        {rng.choice(tricky if rng.random() < 0.02 else keys): value() for _ in range(rng.randrange(0, 4))}
        for _ in range(n)
    ]


def test_records_cut_from_any_body_read_as_the_records_that_were_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", 1)
    rng = random.Random(20261128)
    cut = read = 0
    for trial in range(600):
        n = rng.randrange(1, 8)
        records = random_records(rng, n)
        body = rng.choice(list(FORMATS.values()))({"records": records})
        picked = None if trial % 3 else sorted(rng.sample(range(n), rng.randrange(1, n + 1)))
        log_item = item(rows=n if picked is None else len(picked))
        with_body(log_item, body, picked)
        back = handed_over(log_item)
        texts = record_texts(body, log_item.body_records)
        if texts is not None:
            assert [orjson.loads(b"{" + t + b"}") for t in texts] == read_json(body)["records"], body
        cut += back.record_texts is not None
        read += back.raw_rows is not None
        [wire] = encode(back, source="/s", max_bytes=1_000_000)
        assert orjson.loads(wire[2]) == orjson.loads(dict_per_row(log_item)), body
    # Both ways are taken often (the tricky strings, nested values and long integers force a read).
    assert cut > 300 and read > 60, (cut, read)


@pytest.mark.parametrize(
    "body",
    [
        b'{"records": [{"a": "},{"}, {"a": 1}]}',
        b'{"records":[{"a":"}, {"},{"a":1}]}',
        b'{"records": [{"a": [{"b": 1}, {"c": 2}]}, {"a": 1}]}',
        b'{"records": [{"a": "\\u0041"}, {"a": 1}]}',
        # Read as one member (the last), but two in the text: the backslash is what tells.
        b'{"records": [{"a": 0}], "rec\\u006frds": [{"a": 1}, {"a": 1}]}',
        b'{"records": [{"records": 1}, {"a": 1}]}',
        b'{"records": [{"a": 1}, {"a": 1}]}' + b" " * 300,
        b'\xef\xbb\xbf{"records": [{"a": 1}, {"a": 1}]}',
        b'{"records": [{"a": 1}, {"a": 1}, {"a": 1}]}',
    ],
)
def test_a_body_whose_records_cannot_be_cut_is_read(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", 1)
    assert record_texts(body, 2) is None


@pytest.mark.parametrize("spacing", list(FORMATS))
def test_the_consumers_fast_readers_take_records_cut_from_a_body_as_the_validated_event(spacing: str) -> None:
    records = [
        {
            "tenure_months": i,
            "monthly_charges": None if i % 3 else 20.25 * i,
            "plan": ("basic", "pro x")[i % 2],
        }
        for i in range(12)
    ]
    log_item = with_body(item(rows=12), FORMATS[spacing]({"records": records}))
    back = handed_over(log_item)
    assert back.record_texts is not None
    [(_, _, value, _)] = encode(back, source="/s", max_bytes=1_000_000)
    expected = validated(log_item)
    assert read_predictions_logged(value) == expected
    assert read_prediction_columns(value) == PredictionColumns.of(expected)


def test_a_body_of_records_only_is_cut_however_it_is_spaced(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b' \n{ "records" :\t[ {"a": 1, "b": "x y"} ,\r\n{} , { "c" : [1, 2] } ] }\n'
    assert record_texts(body, 3) is None  # so few are read: as cheap
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", 1)
    assert record_texts(body, 3) == [b'"a": 1, "b": "x y"', b"", b' "c" : [1, 2] ']
    assert record_texts(body, None) is None


def test_a_frame_reusing_a_body_never_read_is_refused() -> None:
    log_item = with_body(item(rows=2), orjson.dumps({"records": [{}, {}]}))
    with pytest.raises(ValueError, match="never read"):
        handed_over(log_item, body_sent=True)


def test_a_frame_reusing_the_body_of_a_frame_that_could_not_be_read_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The canary's frame says "the stable one's body": if the stable frame failed before its body was
    # kept, the body still kept is an earlier request's, and its records would be logged as this one's.
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", 1)
    unpack = Unpacker()
    earlier = [{"tenure_months": 100 + i, "monthly_charges": 1.5, "plan": "basic"} for i in range(5)]
    handed_over(with_body(item(rows=5), orjson.dumps({"records": earlier})), unpack)
    records = [{"tenure_months": i, "monthly_charges": 10.5 * i, "plan": "basic"} for i in range(5)]
    body = orjson.dumps({"records": records})
    stable = as_scored(with_body(item(rows=3), body, [0, 2, 4]), "float64", [0, 2, 4])
    stable.prediction_ids.append("churn:7:tok-5")  # its arrays no longer match its rows
    canary = with_body(item(rows=2), body, [1, 3])
    with pytest.raises(ValueError, match="for 4 rows"):
        handed_over(stable, unpack)
    with pytest.raises(ValueError, match="never read"):
        handed_over(canary, unpack, body_sent=True)


class Written:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)


async def test_items_are_packed_at_the_flush_in_one_write_in_order_and_an_unpackable_one_is_counted() -> None:
    log = ProcessPredictionLog(NOWHERE, source="/s", buffer=2, batch=2, linger_ms=0, handoff_bytes=1 << 20)
    transport = Written()
    log._transport = transport  # type: ignore[assignment]  # as a running producer's socket
    body = orjson.dumps({"records": [{"tenure_months": 1}, {"tenure_months": 2}]})
    stable, canary = with_body(item(rows=1), body, [0]), with_body(item(rows=1), body, [1])
    unpackable = item(rows=1)
    unpackable.entity_keys = [object()]  # type: ignore[list-item]
    before = DROPPED.labels("unencodable")._value.get()
    assert log.offer(stable) and log.offer(unpackable) and log.offer(canary)
    assert transport.writes == []  # nothing packed on the request's path

    async def written() -> list[bytes]:
        return transport.writes

    [data] = await eventually(written, deadline_s=5, interval_s=0.001)
    unpack, frames = Unpacker(), []
    while data:
        size, head = FRAME.unpack_from(data)
        frames.append(unpack(data[FRAME.size : FRAME.size + size], head))
        data = data[FRAME.size + size :]
    assert [inputs(f) for f in frames] == [[{"tenure_months": 1}], [{"tenure_months": 2}]]
    assert b'"body":"same"' in transport.writes[0]  # the second frame reuses the first one's body
    assert DROPPED.labels("unencodable")._value.get() == before + 1
    assert log._written == 2  # the unpackable item is not also counted as lost with the producer


async def test_the_socket_to_the_producer_buffers_as_much_as_the_hand_off_as_far_as_the_kernel_allows() -> (
    None
):
    # With the default buffer (~208 KiB) a loop turn at saturation could hand over ~10 frames of 100 rows,
    # fewer than it answered: the hand-off filled up while the child sat idle.
    handoff = 4 << 20
    log = ProcessPredictionLog(
        NOWHERE, source="/s", buffer=2, batch=2, linger_ms=0, handoff_bytes=handoff, stop_timeout_s=1
    )
    running = asyncio.create_task(log.run())
    await asyncio.wait_for(log.connected(), timeout=30)
    assert log._transport is not None
    sock = log._transport.get_extra_info("socket")
    default_a, default_b = socket.socketpair()
    with default_a, default_b:
        default = default_a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    with open("/proc/sys/net/core/wmem_max") as limit:  # noqa: ASYNC230  # procfs: never blocks
        wmem_max = int(limit.read())
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert got == max(default, 2 * min(handoff // 2, wmem_max))
    await log.stop()
    await asyncio.wait_for(running, timeout=30)


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


async def test_a_row_the_producer_finds_larger_than_the_event_limit_is_counted_in_serving() -> None:
    # Only the producer process encodes, so only its report can tell serving.
    log = ProcessPredictionLog(
        KafkaSettings(bootstrap="127.0.0.1:1", max_event_bytes=3_000),
        source="/s",
        buffer=10,
        batch=2,
        linger_ms=0,
        handoff_bytes=1 << 20,
        stop_timeout_s=1,
    )
    before = DROPPED.labels("oversized")._value.get()
    running = asyncio.create_task(log.run())
    await asyncio.wait_for(log.connected(), timeout=30)
    assert log.offer(one_row_over(3_000))

    async def oversized() -> bool:
        return DROPPED.labels("oversized")._value.get() == before + 1

    try:
        assert await eventually(oversized, deadline_s=30)
    finally:
        await log.stop()
        await asyncio.wait_for(running, timeout=30)


async def test_a_producer_that_stops_reporting_is_killed_and_replaced_and_what_it_held_is_counted() -> None:
    # Alive but stuck (SIGSTOP stands for a deadlock or a blocked loop), it would never exit: before, the
    # hand-off filled up and every later item was dropped as buffer-full until serving restarted.
    log = ProcessPredictionLog(
        NOWHERE,
        source="/s",
        buffer=100,
        batch=2,
        linger_ms=0,
        handoff_bytes=1 << 20,
        stall_s=1,
        stop_timeout_s=1,
    )
    stalled_before = DROPPED.labels("producer-stalled")._value.get()
    exited_before = DROPPED.labels("producer-exited")._value.get()
    running = asyncio.create_task(log.run())
    try:
        await asyncio.wait_for(log.connected(), timeout=30)
        assert log.process is not None
        stuck = log.process
        held = [item() for _ in range(5)]  # the broker is unreachable: the producer holds them
        assert all(log.offer(i) for i in held)
        os.kill(stuck.pid, signal.SIGSTOP)

        async def replaced() -> bool:
            return log.process is not stuck and log._connected.is_set()

        await eventually(replaced, deadline_s=60)
        assert stuck.returncode == -signal.SIGKILL  # killed and reaped: no orphan, one child at a time
        assert gone(stuck.pid)
        assert log.process is not None and log.process.poll() is None
        assert DROPPED.labels("producer-stalled")._value.get() - stalled_before == len(held)
        assert DROPPED.labels("producer-exited")._value.get() == exited_before
        assert log.offer(item())  # the new producer takes items
    finally:
        await log.stop()
        await asyncio.wait_for(running, timeout=30)


async def test_a_producer_whose_sends_wait_on_a_slow_broker_keeps_reporting_and_is_not_replaced() -> None:
    # A broker that takes connections and answers nothing: the producer's sender waits on it, its queue
    # fills, it stops reading and the hand-off fills; its reports come from another task and go on.
    stall_s = 2.0
    with socket.create_server(("127.0.0.1", 0)) as broker:
        port = broker.getsockname()[1]
        log = ProcessPredictionLog(
            KafkaSettings(bootstrap=f"127.0.0.1:{port}"),
            source="/s",
            buffer=1,
            batch=1,
            linger_ms=0,
            handoff_bytes=64 * 1024,
            stall_s=stall_s,
            stop_timeout_s=1,
        )
        stalled_before = DROPPED.labels("producer-stalled")._value.get()
        full_before = DROPPED.labels("buffer-full")._value.get()
        running = asyncio.create_task(log.run())
        try:
            await asyncio.wait_for(log.connected(), timeout=30)
            assert log.process is not None
            busy = log.process

            async def hand_off_full() -> bool:
                log.offer(big_item())
                return DROPPED.labels("buffer-full")._value.get() > full_before

            await eventually(hand_off_full, deadline_s=30, interval_s=0.01)
            reports = log._reports

            async def reported_for_two_stall_periods_or_replaced() -> bool:
                return log.process is not busy or log._reports - reports >= 2 * stall_s / _REPORT_S

            await eventually(reported_for_two_stall_periods_or_replaced, deadline_s=60)
            assert log.process is busy and busy.poll() is None
            assert DROPPED.labels("producer-stalled")._value.get() == stalled_before
            assert not log.offer(big_item())  # still busy: the hand-off is still full
        finally:
            await log.stop()
            await asyncio.wait_for(running, timeout=30)


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
    # scipy too (sklearn's): serving's canary test once loaded it here, seconds of every producer start.
    code = (
        "import sys, services.serving.adapters.log_producer; "
        "print(sorted(m for m in ('pandas', 'scipy', 'sklearn', 'onnxruntime', 'fastapi') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_producers_restart_wait_doubles_while_it_dies_young_and_starts_over_after_a_healthy_run() -> None:
    waits: list[float] = []
    delay: float | None = None
    for ran_s in (0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 3_600.0, 0.1):
        delay = restart_delay(delay, ran_s=ran_s)
        waits.append(delay)

    assert waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 0.5, 1.0]
