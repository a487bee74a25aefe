"""Files of the audit service: the dev signing key and the checkpoint archive (NDJSON)."""

from __future__ import annotations

import base64
import fcntl
import heapq
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import orjson
from pydantic import ValidationError

from contracts.audit import AuditCheckpoint
from libs.logging import get_logger
from services.audit.settings import AuditSettings, decode_key

log = get_logger(__name__)


def signing_seed(settings: AuditSettings) -> bytes:
    """The Ed25519 seed: from the setting, else (dev and test only) from the key file, made once."""
    if settings.signing_key is not None and settings.signing_key.get_secret_value().strip():
        return decode_key(settings.signing_key.get_secret_value(), "DRIFTLOOP_AUDIT_SIGNING_KEY")
    if settings.env == "prod":
        # The settings validator refuses this already; kept so no path ever signs with a file key in prod.
        raise ValueError("DRIFTLOOP_AUDIT_SIGNING_KEY is required for DRIFTLOOP_ENV=prod")
    path = settings.signing_key_file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(seed).decode() + "\n")
            log.warning("generated a development signing key for the audit trail", path=str(path))
    return decode_key(path.read_text(), str(path))


# Below this many bytes between its bounds, the search for a range's first line reads on line by line.
SEARCH_BLOCK_BYTES = 64 * 1024


class CheckpointFile:
    """Checkpoints as NDJSON lines (one AuditCheckpoint JSON each), appended in sequence order.

    ``in_order`` (the service's own file, which only ``append`` writes): its lines are in sequence order, so a
    range's first line is found by a binary search on byte offsets and its newest checkpoint at its end,
    and neither a range nor the start reads years of checkpoints. A file from elsewhere (``verify
    --checkpoints``) is read from its start to its end: a line out of order there must not hide a
    checkpoint; once read through (:meth:`last_sequence`), it is searched too if its lines were in order."""

    def __init__(self, path: Path, *, in_order: bool = False) -> None:
        self.path = path
        self.in_order = in_order
        self._searched = in_order  # its lines are known to be in sequence order
        self._last: int | None = None  # the newest sequence in the file, once read
        self._read_at: FileStamp | None = None  # the file as it was when _last was read or written

    def read(
        self, *, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        """The file's checkpoints for rows ``after+1 .. upto`` (default: every one), in file order; a line
        that is not a checkpoint is skipped with a warning. ``page``: only those of the ``page`` lowest
        sequences of the range (more when the last has several: a page never splits one).

        Only the range's lines are made checkpoints: a line of another sequence is passed over once its
        ``sequence`` is read, so a verification or an export of a few rows holds their checkpoints, not
        years of them; in a file in order, the lines before the range are searched, not read, and
        those after it (or after the page) not read at all. A page of a file out of order costs two
        passes over the file, holding ``page`` sequence numbers."""
        if not self.path.exists():
            return []
        if page is not None and not self._searched:
            upto = self._page_end(after, upto, page)
        checkpoints: list[AuditCheckpoint] = []
        with self.path.open("rb") as lines:
            offset = _range_start(lines, after) if self._searched and after > 0 else 0
            lines.seek(offset)
            for line in lines:
                at, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                seq = _sequence_of(line)
                if seq is not None and self._searched:
                    if upto is not None and seq > upto:
                        break
                    if page is not None and len(checkpoints) >= page and seq > checkpoints[-1].sequence:
                        break
                if seq is not None and (seq <= after or (upto is not None and seq > upto)):
                    continue
                checkpoint = self._checkpoint(line, at)
                if checkpoint is None or checkpoint.sequence <= after:
                    continue
                # A line whose sequence only the model reads (not a JSON integer) is held to the range too.
                if upto is None or checkpoint.sequence <= upto:
                    checkpoints.append(checkpoint)
        return checkpoints

    def _checkpoint(self, line: bytes, offset: int) -> AuditCheckpoint | None:
        try:
            return AuditCheckpoint.model_validate_json(line)
        except ValidationError as exc:
            log.warning("not a checkpoint, skipped", path=str(self.path), offset=offset, error=str(exc))
            return None

    def _page_end(self, after: int, upto: int | None, page: int) -> int | None:
        """The ``page``-th lowest sequence of the range in a file out of order (``upto`` when it has fewer):
        one pass, holding ``page`` numbers."""
        with self.path.open("rb") as lines:
            in_range = (
                seq
                for seq in map(_sequence_of, lines)
                if seq is not None and seq > after and (upto is None or seq <= upto)
            )
            lowest = heapq.nsmallest(page, in_range)
        return lowest[-1] if len(lowest) == page else upto

    def last_sequence(self) -> int:
        """The newest sequence in the file (0: none); read once, then kept as this object appends, while the
        file is as this object left it. In a file ``in_order``, its last checkpoint, read from the end; in
        another, read through (one checkpoint held at a time), which shows whether its lines are in order.

        A file changed by another hand (restored from a backup, a line moved out of it, removed) is read
        again: kept at its old end, the service took only checkpoints past that end until it restarted."""
        stamp = _stamp(self.path)
        if self._last is None or stamp != self._read_at:
            self._searched = self.in_order
            self._last = self._last_in_order() if self.in_order else self._read_through()
            self._read_at = stamp
        return self._last

    def _read_through(self) -> int:
        if not self.path.exists():
            return 0
        last, previous, in_order = 0, 0, True
        with self.path.open("rb") as lines:
            offset = 0
            for line in lines:
                at, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                seq = _sequence_of(line)
                if seq is not None:
                    in_order, previous = in_order and seq >= previous, seq
                checkpoint = self._checkpoint(line, at)
                if checkpoint is not None:
                    last = max(last, checkpoint.sequence)
        self._searched = self._searched or in_order
        return last

    def _last_in_order(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as lines:
            for line in _lines_from_the_end(lines):
                if not line.strip():
                    continue
                try:
                    return AuditCheckpoint.model_validate_json(line).sequence
                except ValidationError as exc:
                    log.warning("not a checkpoint, skipped", path=str(self.path), error=str(exc))
        return 0

    def append(self, checkpoints: Sequence[AuditCheckpoint]) -> int:
        """Append those newer than the file's newest; one write per line, so lines never interleave.

        The file's lock (an flock on it) is held from the read of its newest checkpoint to the last write:
        replicas of the service with the same settings on one host (or a shared volume) append to one file,
        and two that read its end at once each appended the same checkpoints, leaving the file's lines out
        of sequence order, which its search relies on. Readers need not take it: lines are written whole."""
        if not self._newer(checkpoints):
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # Closing the descriptor releases the lock, and the kernel does so for a writer that dies.
            fcntl.flock(fd, fcntl.LOCK_EX)
            newer = self._newer(checkpoints)  # read again under the lock: another writer may have added them
            if not newer:
                return 0
            if _torn(fd):
                # A write cut short (a crash, a full disk) left a line without its end: the torn line is
                # skipped when read, and must not take the next checkpoint with it.
                os.write(fd, b"\n")
            for cp in newer:
                os.write(fd, orjson.dumps(cp.model_dump(mode="json")) + b"\n")
            os.fsync(fd)
            self._read_at = _stamp(self.path)
        finally:
            os.close(fd)
        self._last = newer[-1].sequence
        return len(newer)

    def _newer(self, checkpoints: Sequence[AuditCheckpoint]) -> list[AuditCheckpoint]:
        """Those of ``checkpoints`` newer than the file's newest, in sequence order."""
        last = self.last_sequence()
        return sorted((c for c in checkpoints if c.sequence > last), key=lambda c: c.sequence)


FileStamp = tuple[int, int, int, int]
"""A file's device, inode, size and modification time (ns): another hand's change shows in one of them."""


def _stamp(path: Path) -> FileStamp | None:
    """The file's :data:`FileStamp` (None: there is none)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sequence_of(line: bytes) -> int | None:
    """The ``sequence`` of a checkpoint's JSON line, None when the line is not JSON with an integer one
    (it is then validated, and skipped with a warning, whatever the range)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    seq = obj.get("sequence") if isinstance(obj, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _range_start(lines: BinaryIO, after: int) -> int:
    """The offset of a line at or before the first checkpoint of a sequence above ``after`` in a file whose
    lines are in sequence order, and after every one of ``after`` or below but for the last block's.
    Lines that are not checkpoints (a torn one) are passed over to the next that is."""
    lo = 0  # a line's start; every checkpoint before it is of ``after`` or below
    hi = lines.seek(0, os.SEEK_END)  # the first checkpoint above ``after`` starts at hi or before
    while hi - lo > SEARCH_BLOCK_BYTES:
        mid = (lo + hi) // 2
        lines.seek(mid - 1)
        lines.readline()  # to the start of the line after the one ``mid`` falls in
        pos = lines.tell()
        seq = None
        while seq is None and pos < hi:
            line = lines.readline()
            if not line:
                break
            seq = _sequence_of(line)
            pos += len(line)
        if seq is not None and seq <= after:
            lo = pos
        else:  # above ``after`` (its line starts past mid), or no checkpoint from mid to hi
            hi = mid
    return lo


def _lines_from_the_end(lines: BinaryIO) -> Iterator[bytes]:
    """The file's lines, the last first (a last line without its newline too)."""
    block = SEARCH_BLOCK_BYTES
    end = lines.seek(0, os.SEEK_END)
    tail = b""
    while end > 0:
        start = max(0, end - block)
        lines.seek(start)
        chunk = lines.read(end - start) + tail
        end = start
        # The first piece may be the end of a line that began in the block before.
        first, *rest = chunk.split(b"\n")
        tail = first
        yield from reversed(rest)
    yield tail


def _torn(fd: int) -> bool:
    """Whether the file open at ``fd`` ends inside a line (not empty, its last byte no newline)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
