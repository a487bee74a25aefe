"""Python CPU per row of the trail's write path, stage by stage, without a database.

    .venv/bin/python -m bench.audit.profile_rows [--events 50000] [--batch 500] [--repeat 5]

Each stage runs the same records in the same batches as bench/audit/run.py and includes the stages before
it: the handler's bookkeeping (Incoming, positions, redelivery and re-sent-copy checks with nothing held),
the head-independent part of each row (meta JSON, record, its SHA-256, indexed copies), numbering,
chaining and sealing, and the COPY encoder. The difference between two lines is what a stage costs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from bench.audit.run import platform_records
from contracts.topics import DEAD_LETTER
from libs.bus.core import Record
from services.audit.adapters.postgres import copy_data
from services.audit.domain import (
    ChainBuilder,
    ChainHead,
    Incoming,
    KafkaPosition,
    Signer,
    event_keys,
    new_positions,
    unchained_rows,
    without_resent_copies,
)


def _drain(agen: object) -> int:
    """Run an async generator that never awaits, synchronously; returns the bytes it yielded."""
    total = 0
    it = agen.__aiter__()  # type: ignore[attr-defined]
    while True:
        try:
            it.__anext__().send(None)
        except StopIteration as done:
            total += len(done.value)
        except StopAsyncIteration:
            return total


def _bookkeeping(poll: Sequence[Record]) -> list[Incoming]:
    incoming = [Incoming(r, None, True) for r in poll]
    positions = [KafkaPosition(r.topic, r.partition, r.offset) for r in poll]
    fresh = new_positions(incoming, {}, positions)
    keys = event_keys(fresh)
    if [k for k in keys if k is not None]:
        fresh = without_resent_copies(fresh, keys, {})
    return fresh


def stages(signer: Signer) -> dict[str, Callable[[Sequence[Record], ChainHead], ChainHead]]:
    """Each stage as a function of one poll and the head before it, returning the head after it."""
    at = datetime.now(UTC)

    def bookkeeping(poll: Sequence[Record], head: ChainHead) -> ChainHead:
        _bookkeeping(poll)
        return head

    def unchained(poll: Sequence[Record], head: ChainHead) -> ChainHead:
        for _ in unchained_rows(_bookkeeping(poll), recorded_at=at, dead_letter_topic=DEAD_LETTER):
            pass
        return head

    def chained(poll: Sequence[Record], head: ChainHead) -> ChainHead:
        builder = ChainBuilder(head, recorded_at=at, sealer=signer.sealer, dead_letter_topic=DEAD_LETTER)
        for _ in builder.rows(_bookkeeping(poll)):
            pass
        return builder.head

    def encoded(poll: Sequence[Record], head: ChainHead) -> ChainHead:
        builder = ChainBuilder(head, recorded_at=at, sealer=signer.sealer, dead_letter_topic=DEAD_LETTER)
        _drain(copy_data(builder.rows(_bookkeeping(poll))))
        return builder.head

    return {
        "bookkeeping": bookkeeping,
        "+ meta, record, SHA-256, copies": unchained,
        "+ number, chain, seal": chained,
        "+ COPY encoder": encoded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each stage; the best counts")
    args = parser.parse_args()
    records = platform_records(args.events)
    polls = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    gc.freeze()
    signer = Signer(os.urandom(32))
    for name, stage in stages(signer).items():
        best = float("inf")
        for _ in range(args.repeat):
            head = ChainHead()
            t0 = time.process_time()
            for poll in polls:
                head = stage(poll, head)
            best = min(best, time.process_time() - t0)
        print(f"{name:<34} {best / len(records) * 1e6:6.2f} us per row", flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.sleep(0))  # the event loop's import cost stays out of the first stage
    main()
