#!/usr/bin/env python3
"""An audit-log consumer outside the platform: reads a driftloop audit export and verifies it as it reads.

It needs nothing of driftloop: the Python standard library, ``cryptography`` for Ed25519, and ``aiokafka``
only to read checkpoints from the ``mlops.audit`` topic. docs/audit.md is the contract it implements.

    # from the running audit service (an auditor's token: the export holds traffic data), pinning the
    # trail's public key
    python docs/examples/audit_consumer.py --export http://127.0.0.1:8106/v1/export --token dev-auditor \
        --public-key "$(curl -s -H 'Authorization: Bearer dev-auditor' http://127.0.0.1:8106/v1/keys \
                        | python -c 'import json,sys; print(json.load(sys.stdin)[0]["public_key"])')"

    # from a saved export, with the checkpoints kept elsewhere (the file, or the audit topic)
    python docs/examples/audit_consumer.py --export trail.ndjson --public-key BASE64 \
        --checkpoints .driftloop/audit/checkpoints.ndjson --kafka 127.0.0.1:19092

Exit status 0: every row chains, every checkpoint is signed by a pinned key and matches the chain, no
known checkpoint lies beyond the end, and the rows reach the header's to_seq; the OK line says which rows a
signed checkpoint vouches for (the others, only the chain, which anyone can recompute). A checkpoint of a
key not pinned fails verification in the export or a file; on the audit topic, which other trails share, it
is a warning (never proof). Exit status 1: the first bad sequence number and why (rows cut off the end are
named up to the highest signed checkpoint beyond it), or an input that could not be read (``error: ...``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any, NamedTuple, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EXPORT_FORMAT = "driftloop-audit-export/1"
SIGNING_DOMAIN = b"driftloop-audit-checkpoint/v1"
CHECKPOINT_TYPE = "io.driftloop.AuditCheckpoint.v1"


class Unreadable(Exception):
    """An input (the export, a checkpoint file, the audit topic) cannot be read: nothing was verified."""


class Broken(Exception):
    """The trail does not verify: ``seq`` is the first bad sequence number."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"sequence {seq}: {reason}")
        self.seq = seq
        self.reason = reason


# --- the contract: chain step and checkpoint signature ------------------------------------------------


def row_hash(prev: bytes, seq: int, record: bytes) -> bytes:
    """row_hash(n) = SHA-256(row_hash(n-1) || uint64_be(n) || SHA-256(record(n)))."""
    return hashlib.sha256(prev + seq.to_bytes(8, "big") + hashlib.sha256(record).digest()).digest()


def signing_input(checkpoint: dict[str, Any]) -> bytes:
    """The bytes a checkpoint's signature covers: domain, sequence, head hash, row count, UTC time."""
    signed_at = datetime.fromisoformat(checkpoint["signed_at"].replace("Z", "+00:00")).astimezone(UTC)
    return b"\n".join(
        [
            SIGNING_DOMAIN,
            str(checkpoint["sequence"]).encode(),
            checkpoint["head_hash"].encode(),
            str(checkpoint["row_count"]).encode(),
            signed_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode(),
        ]
    )


def key_id(public_raw: bytes) -> str:
    """A key's id: the first 16 hex digits of SHA-256 of the raw public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


class Keys:
    """The public keys this consumer trusts (pinned on the command line)."""

    def __init__(self, public_keys: list[str]) -> None:
        self.by_id: dict[str, Ed25519PublicKey] = {}
        for text in public_keys:
            raw = base64.b64decode(text)
            self.by_id[key_id(raw)] = Ed25519PublicKey.from_public_bytes(raw)

    def pinned(self, checkpoint: dict[str, Any]) -> bool:
        """Whether the checkpoint names a pinned key (its signature unchecked)."""
        return checkpoint.get("key_id") in self.by_id

    def problem(self, checkpoint: dict[str, Any]) -> str | None:
        """None when a pinned key made the signature over exactly these fields, else why not."""
        key = self.by_id.get(checkpoint.get("key_id", ""))
        if key is None:
            return (
                f"it is signed by key {shown(checkpoint.get('key_id'))}, which is not pinned here, so it "
                "vouches for nothing; pin its public key with --public-key if it is a retired key of this "
                "trail"
            )
        try:
            key.verify(base64.b64decode(checkpoint["signature"]), signing_input(checkpoint))
        except (InvalidSignature, ValueError):
            return "its signature does not match its contents (forged or altered)"
        if checkpoint["row_count"] != checkpoint["sequence"]:
            return f"it claims {checkpoint['row_count']} rows up to sequence {checkpoint['sequence']}"
        return None


# --- reading -------------------------------------------------------------------------------------


CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Characters a terminal acts on rather than prints (C0 and C1 controls, DEL, bidirectional marks and
overrides): ESC alone can clear the screen or print over the verdict."""


def shown(text: object) -> str:
    """Text from the export (whoever wrote it), as a terminal may print it: each control as its escape."""
    return CONTROLS.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) <= 0xFF else f"\\u{ord(m[0]):04x}", str(text)
    )


HEX_HASH = re.compile(r"[0-9a-f]{64}")
CHECKPOINT_FIELDS = {
    "sequence": int,
    "head_hash": str,
    "row_count": int,
    "signed_at": str,
    "key_id": str,
    "signature": str,
}


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def checkpoint_problem(cp: Any) -> str | None:
    """What is wrong with the shape of a checkpoint (None: nothing), before its signature is checked."""
    if not isinstance(cp, dict):
        return "a checkpoint must be a JSON object"
    for name, kind in CHECKPOINT_FIELDS.items():
        value = cp.get(name)
        if not (_is_int(value) if kind is int else isinstance(value, kind)):
            return f"the checkpoint's {name} is missing or not {'an integer' if kind is int else 'text'}"
    return None


class CheckpointCopy(NamedTuple):
    """A checkpoint as one input carries it: where it was read, and whether that input is a channel other
    trails publish on too (the audit topic) rather than this trail's own copy (the export, a file)."""

    checkpoint: dict[str, Any]
    where: str
    shared: bool = False

    @property
    def sequence(self) -> int:
        return int(self.checkpoint["sequence"])


class Verifier:
    """Verifies an export line by line; checkpoints from elsewhere are checked when their row passes."""

    def __init__(self, keys: Keys, outside: list[CheckpointCopy], *, show: bool, out: IO[str]) -> None:
        self.keys = keys
        self.outside: dict[int, list[CheckpointCopy]] = {}
        for copy in outside:
            self.outside.setdefault(copy.sequence, []).append(copy)
        self.show = show
        self.out = out
        self.prev: bytes | None = None
        self.from_seq = 0
        self.to_seq = 0
        self.next_seq = 0
        self.lines = 0
        self.rows = 0
        self.checkpoints = 0
        # A checkpoint is counted once however many inputs carry it (the export, a file, the topic): the
        # service names one by its sequence and signature, as here.
        self.counted: set[tuple[int, str]] = set()
        self.vouched = 0  # the highest row a signed checkpoint that matches the chain vouches for
        # Checkpoints of the export for rows that did not come before them: a cut tail's, which the service
        # puts after the last row. Judged at the end, all together: the rows missing run to the highest.
        self.ahead: list[CheckpointCopy] = []
        # Checkpoints of the audit topic signed by keys not pinned (other trails publish there too): not
        # counted, and reported (key id -> their sequences).
        self.unpinned: dict[str, list[int]] = {}

    def line(self, text: str | bytes) -> None:
        """One NDJSON line of the export: the header first and only there, then rows and checkpoints."""
        self.lines += 1
        try:
            obj = json.loads(text)
        except ValueError:  # UnicodeDecodeError included
            raise self._damaged("is not JSON text") from None
        if not isinstance(obj, dict):
            raise self._damaged("is not a JSON object")
        if self.prev is None:
            self._header(obj)
        elif "format" in obj:
            # A second header would re-base the chain on a hash of its choosing: a forged row before it
            # would go unnoticed.
            raise self._damaged("is a second header line: an export has one, its first line")
        elif "checkpoint" in obj:
            problem = checkpoint_problem(obj["checkpoint"])
            if problem is not None:
                raise self._damaged(f"is a damaged checkpoint: {problem}")
            self._checkpoint(CheckpointCopy(obj["checkpoint"], f"line {self.lines} of the export"))
        else:
            self._row(obj)

    def _damaged(self, why: str) -> Broken:
        return Broken(self.next_seq, f"line {self.lines} of the export {why}")

    def _header(self, obj: dict[str, Any]) -> None:
        if "format" not in obj:
            raise self._damaged("is not the export's header line: the header must come first")
        if obj["format"] != EXPORT_FORMAT:
            raise Broken(0, f"unknown export format {obj['format']!r}")
        from_seq, prev_hash = obj.get("from_seq"), obj.get("prev_hash")
        if not (_is_int(from_seq) and from_seq >= 1):
            raise self._damaged("is a header without a from_seq of 1 or more")
        if prev_hash is None and from_seq > 1:
            # The service exports a hash nulled in its database as null: the row before from_seq is bad.
            raise Broken(
                from_seq - 1,
                f"line {self.lines} of the export is a header whose prev_hash is null: row {from_seq - 1} "
                "has no hash in the trail to chain from",
            )
        if not (isinstance(prev_hash, str) and HEX_HASH.fullmatch(prev_hash)):
            raise self._damaged("is a header without a prev_hash of 64 lowercase hex digits")
        to_seq = obj.get("to_seq")
        if not (_is_int(to_seq) and to_seq >= from_seq - 1):
            raise self._damaged("is a header without a to_seq of from_seq - 1 or more")
        self.prev = bytes.fromhex(prev_hash)
        self.from_seq = self.next_seq = from_seq
        self.to_seq = to_seq

    def _row(self, obj: dict[str, Any]) -> None:
        seq, stated = obj.get("seq"), obj.get("row_hash")
        if not _is_int(seq) or not isinstance(stated, str):
            raise self._damaged("is neither a row (seq, row_hash, record) nor a checkpoint")
        if self.ahead:
            early = self.ahead[0]
            raise Broken(
                early.sequence,
                f"the checkpoint at {early.sequence} ({early.where}) is out of place in the export: it comes "
                f"before row {self.next_seq}",
            )
        if seq != self.next_seq:
            raise Broken(self.next_seq, f"row {self.next_seq} is missing (the next row is {seq})")
        record = self._record(obj)
        assert self.prev is not None  # the header came first
        computed = row_hash(self.prev, seq, record)
        if computed.hex() != stated:
            raise Broken(seq, "the row's hash does not match its record and the previous row's hash")
        self.prev = computed
        self.next_seq = seq + 1
        self.rows += 1
        for copy in self.outside.pop(seq, []):
            self._checkpoint(copy)
        if self.show:
            self.out.write(f"{seq:>8}  {describe(record)}\n")

    def _record(self, obj: dict[str, Any]) -> bytes:
        if isinstance(obj.get("record"), str):
            try:
                return obj["record"].encode()
            except UnicodeEncodeError:  # JSON lets a string hold a lone surrogate, which UTF-8 cannot
                raise self._damaged("has a record that is not valid UTF-8 text") from None
        if isinstance(obj.get("record_base64"), str):
            try:
                return base64.b64decode(obj["record_base64"], validate=True)
            except ValueError:
                raise self._damaged("has a record_base64 that is not base64") from None
        raise self._damaged("is a row without a record (text) or record_base64")

    def _checkpoint(self, copy: CheckpointCopy) -> None:
        cp, seq = copy.checkpoint, copy.sequence
        if self.prev is not None and seq >= self.next_seq:
            # For rows that did not come before it: the service puts the checkpoints of rows cut off the
            # trail's end after its last row. finish() says how far the rows they cover go.
            self.ahead.append(copy)
            return
        if not self._signed(copy):
            return
        if self.prev is None or seq != self.next_seq - 1:
            raise Broken(seq, f"the checkpoint at {seq} is out of place in the export")
        if cp["head_hash"] != self.prev.hex():
            raise Broken(seq, f"the trail's hash at {seq} differs from the signed checkpoint: rewritten")
        # Counted only once checked: a copy that differs from the one counted fails above, never hides.
        if (seq, cp["signature"]) not in self.counted:
            self.counted.add((seq, cp["signature"]))
            self.checkpoints += 1
        self.vouched = max(self.vouched, seq)

    def _signed(self, copy: CheckpointCopy) -> bool:
        """Whether a pinned key signed the checkpoint. One that is not is a failure, never a checkpoint
        passed over: the export and a file are this trail's own copies. Only on the audit topic, where other
        trails publish theirs, is a key not pinned reported in a warning instead (False: not counted)."""
        problem = self.keys.problem(copy.checkpoint)
        if problem is None:
            return True
        if copy.shared and not self.keys.pinned(copy.checkpoint):
            self.unpinned.setdefault(shown(copy.checkpoint["key_id"]), []).append(copy.sequence)
            return False
        seq = copy.sequence
        raise Broken(seq, f"the checkpoint at {seq} ({copy.where}) is not signed by a pinned key: {problem}")

    def finish(self) -> None:
        """Signed checkpoints beyond the last row (in the export, or from elsewhere) mean the export (or the
        trail) lost its tail, up to the highest of them; an export that stops before its header's to_seq
        was cut short on its way here."""
        if self.prev is None:
            raise Broken(0, "the export has no header line")
        beyond = [*self.ahead, *(c for s, cs in self.outside.items() if s >= self.next_seq for c in cs)]
        signed, unsigned = set(), []
        for copy in sorted(beyond, key=lambda c: c.sequence):
            try:
                if self._signed(copy):
                    signed.add(copy.sequence)
            except Broken as broken:
                unsigned.append(broken)
        if signed:
            # Named from the first missing row, which comes before any of these checkpoints: one not signed
            # among them is not the first thing wrong.
            raise Broken(
                self.next_seq,
                f"rows {self.next_seq}..{max(signed)} are missing: a signed checkpoint covers them (the "
                f"highest of {len(signed)} signed for rows after {self.next_seq - 1})",
            )
        if unsigned:
            raise unsigned[0]
        if self.next_seq <= self.to_seq:
            # A stream cut at a line boundary (a dropped connection, a partial download) reads like a
            # shorter export; only the header says how far it should go.
            raise Broken(
                self.next_seq,
                f"rows {self.next_seq}..{self.to_seq} are missing: the export stops after row "
                f"{self.next_seq - 1} but its header says it runs to {self.to_seq} (cut short?)",
            )


def describe(record: bytes) -> str:
    """kind, type and subject of a verified record, for --print ('?' where the meta line lacks them)."""
    try:
        meta = json.loads(record.partition(b"\n")[0])
        headers = meta.get("headers") or {}
        kind, event_type, subject = (
            meta.get("kind"),
            headers.get("ce_type", "-"),
            headers.get("ce_subject", "-"),
        )
    except (ValueError, AttributeError):
        return "? (the record's meta line is not a JSON object)"
    return shown(f"{kind!s:<11} {event_type}  {subject}")


def http_get(url: str, token: str | None) -> Any:
    """The response to GET ``url`` (a context manager); an error answer is :class:`Unreadable`, saying what
    the service said: its error body's ``detail`` (or the start of a body that is not one)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(request)
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read(4096)
        try:
            detail = json.loads(body)["detail"]
        except (ValueError, TypeError, KeyError):  # not the service's error body: a proxy's page, say
            detail = None
        said = detail if isinstance(detail, str) else body.decode(errors="replace").strip()[:200]
        raise Unreadable(
            f"{url} answered HTTP {exc.code} {shown(exc.reason)}: {shown(said) or '(no body)'}"
        ) from None
    except urllib.error.URLError as exc:
        raise Unreadable(f"cannot reach {url}: {exc.reason}") from None


def export_lines(source: str, token: str | None) -> Iterator[bytes]:
    """Lines of the export from a URL, a file, or '-' (stdin), read as they stream in."""
    if source.startswith(("http://", "https://")):
        with http_get(source, token) as response:
            try:
                yield from response
            except (http.client.IncompleteRead, OSError) as exc:
                # The connection broke within a chunk: the lines that came are verified, and finish() says
                # what did not come.
                print(f"warning: the connection broke while the export streamed in: {exc!r}", file=sys.stderr)
    elif source == "-":
        yield from sys.stdin.buffer
    else:
        with open(source, "rb") as f:
            yield from f


def file_checkpoints(path: str) -> list[CheckpointCopy]:
    """Checkpoints kept as NDJSON (one AuditCheckpoint per line), like .driftloop/audit/checkpoints.ndjson."""
    found = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                cp = json.loads(line)
            except ValueError:  # UnicodeDecodeError included
                raise Unreadable(f"{path} line {number} is not JSON text") from None
            problem = checkpoint_problem(cp)
            if problem is not None:
                raise Unreadable(f"{path} line {number}: {problem}")
            found.append(CheckpointCopy(cp, f"{path} line {number}"))
    return found


ASSIGNMENT_DEADLINE_S = 30.0


def topic_checkpoints(bootstrap: str, topic: str) -> list[CheckpointCopy]:
    """Every AuditCheckpoint on the audit topic, read from the beginning to the current end."""
    import asyncio
    import time

    try:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.errors import KafkaError
    except ImportError:  # needed for --kafka only, so not among what every reader has installed
        raise Unreadable(
            "--kafka reads the audit topic with aiokafka, which this Python lacks: pip install aiokafka"
        ) from None

    async def read() -> list[CheckpointCopy]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        found: list[CheckpointCopy] = []
        try:
            await consumer.start()
            # Subscribing to a topic that does not exist would wait for it forever (or have a broker that
            # creates topics on demand make an empty one): look first.
            if topic not in await consumer.topics():
                raise Unreadable(f"there is no topic {topic!r} on {bootstrap}: check --topic and --kafka")
            consumer.subscribe([topic])
            deadline = time.monotonic() + ASSIGNMENT_DEADLINE_S
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for messages in batch.values():
                    for m in messages:
                        if dict(m.headers or ()).get("ce_type") == CHECKPOINT_TYPE.encode():
                            found.extend(_topic_checkpoint(m.value, f"{topic} offset {m.offset}"))
                assigned = list(consumer.assignment())
                if not assigned:
                    if time.monotonic() > deadline:
                        raise Unreadable(
                            f"the topic {topic!r} on {bootstrap} was not assigned to this reader within "
                            f"{ASSIGNMENT_DEADLINE_S:.0f} s"
                        )
                    continue
                ends = await consumer.end_offsets(assigned)
                if all([await consumer.position(tp) >= ends[tp] for tp in assigned]):
                    return found
        except KafkaError as exc:
            raise Unreadable(f"cannot read the topic {topic!r} from {bootstrap}: {exc!r}") from exc
        finally:
            await consumer.stop()

    return asyncio.run(read())


def _topic_checkpoint(value: bytes | None, where: str) -> list[CheckpointCopy]:
    """The checkpoint in a message of the audit topic; none (with a warning) when it is not one: like a
    checkpoint of another trail, it cannot vouch for this export."""
    try:
        cp = json.loads(value or b"")
        problem = checkpoint_problem(cp)
    except ValueError:
        problem = "not JSON"
    if problem is None:
        return [CheckpointCopy(cp, where, shared=True)]
    print(f"warning: {where} is not a checkpoint ({problem}): ignored", file=sys.stderr)
    return []


def served_keys(export_url: str, token: str | None) -> Keys:
    """The keys the audit service says it signs with (GET /v1/keys next to the export URL)."""
    url = export_url.split("/v1/export")[0] + "/v1/keys"
    with http_get(url, token) as response:
        try:
            return Keys([k["public_key"] for k in json.load(response)])
        except (ValueError, TypeError, KeyError):
            raise Unreadable(f"{url} did not answer a list of public keys (base64)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify a driftloop audit export as it is read.")
    parser.add_argument("--export", required=True, help="export URL, NDJSON file, or - for stdin")
    parser.add_argument("--token", help="bearer token for an export URL (auditor role)")
    parser.add_argument(
        "--public-key", action="append", default=[], help="pinned Ed25519 public key (base64), repeatable"
    )
    parser.add_argument("--checkpoints", action="append", default=[], help="NDJSON file of checkpoints")
    parser.add_argument("--kafka", help="bootstrap servers: also read checkpoints from the audit topic")
    parser.add_argument("--topic", default="mlops.audit", help="the audit topic (default mlops.audit)")
    parser.add_argument("--print", action="store_true", help="print each event as it is verified")
    args = parser.parse_args(argv)

    if not args.public_key and not args.export.startswith(("http://", "https://")):
        parser.error("--public-key is required for a file export")
    try:
        keys = Keys(args.public_key)
    except ValueError:  # binascii.Error included
        parser.error("--public-key: not the base64 of a raw 32-byte Ed25519 public key")
    verifier: Verifier | None = None
    try:
        if not args.public_key:
            print("warning: no --public-key pinned; trusting the keys the service serves", file=sys.stderr)
            keys = served_keys(args.export, args.token)
        outside = [cp for path in args.checkpoints for cp in file_checkpoints(path)]
        if args.kafka:
            outside += topic_checkpoints(args.kafka, args.topic)
        verifier = Verifier(keys, outside, show=args.print, out=sys.stdout)
        for text in export_lines(args.export, args.token):
            if text.strip():
                verifier.line(text)
        verifier.finish()
    except Broken as broken:
        warn_unpinned(verifier)
        print(f"FAILED at sequence {broken.seq}: {broken.reason}", file=sys.stderr)
        return 1
    except (OSError, Unreadable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    assert verifier is not None  # made before anything that can end the try without an exception
    warn_unpinned(verifier)
    head = verifier.prev.hex() if verifier.prev else "-"
    trusted = (
        f"; rows before {verifier.from_seq} are trusted (the header's prev_hash), not verified"
        if verifier.from_seq > 1
        else ""
    )
    print(
        f"OK: {verifier.rows} rows from sequence {verifier.from_seq} and {verifier.checkpoints} checkpoints "
        f"verified; head {head}{trusted}{vouched_for(verifier)}"
    )
    return 0


def warn_unpinned(verifier: Verifier | None) -> None:
    """One warning per key not pinned whose checkpoints the audit topic carried for the rows verified or
    beyond them: counted for nothing, and said so."""
    for key, seqs in sorted((verifier.unpinned if verifier else {}).items()):
        print(
            f"warning: {len(seqs)} checkpoints on the audit topic (sequences {min(seqs)}..{max(seqs)}) are "
            f"signed by key {key}, which is not pinned: they vouch for nothing here (another trail's, or a "
            "retired key of this one: pin it too with --public-key)",
            file=sys.stderr,
        )


def vouched_for(verifier: Verifier) -> str:
    """Which verified rows a signed checkpoint vouches for. The chain alone proves only that the rows hang
    together: anyone can recompute it (the algorithm is public), so rows after the last checkpoint, or an
    export stripped of its checkpoints, could have been rewritten; only a pinned key's signature says not."""
    last = verifier.next_seq - 1
    if verifier.rows == 0:
        return ""
    if verifier.vouched >= last:
        return "; every row is vouched for by a signed checkpoint"
    if verifier.vouched >= verifier.from_seq:
        return (
            f"; rows up to {verifier.vouched} are vouched for by a signed checkpoint, rows "
            f"{verifier.vouched + 1}..{last} only by the chain"
        )
    return "; no row is vouched for by a signed checkpoint, only by the chain"


if __name__ == "__main__":
    sys.exit(main())
