"""Files of the audit service: the dev signing key and the checkpoint archive (NDJSON)."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path

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


class CheckpointFile:
    """Checkpoints as NDJSON lines (one AuditCheckpoint JSON each), appended in sequence order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: int | None = None  # the newest sequence in the file, once read

    def read(self, *, after: int = 0, upto: int | None = None) -> list[AuditCheckpoint]:
        """The file's checkpoints for rows ``after+1 .. upto`` (default: every one); a line that is not a
        checkpoint is skipped with a warning.

        The file is read a line at a time and only the range's lines are made checkpoints: a line of
        another sequence is passed over once its ``sequence`` is read, so a verification or an export of a
        few rows holds their checkpoints, not years of them."""
        if not self.path.exists():
            return []
        checkpoints = []
        with self.path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                seq = _sequence_of(line)
                if seq is not None and (seq <= after or (upto is not None and seq > upto)):
                    continue
                try:
                    checkpoints.append(AuditCheckpoint.model_validate_json(line))
                except ValidationError as exc:
                    log.warning("not a checkpoint, skipped", path=str(self.path), line=number, error=str(exc))
        return checkpoints

    def last_sequence(self) -> int:
        """The newest sequence in the file (0: none); read once, then kept as this object appends."""
        if self._last is None:
            self._last = max((c.sequence for c in self.read()), default=0)
        return self._last

    def append(self, checkpoints: Sequence[AuditCheckpoint]) -> int:
        """Append those newer than the file's newest; one write per line, so lines never interleave."""
        last = self.last_sequence()
        newer = sorted((c for c in checkpoints if c.sequence > last), key=lambda c: c.sequence)
        if not newer:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _torn(fd):
                # A write cut short (a crash, a full disk) left a line without its end: the torn line is
                # skipped when read, and must not take the next checkpoint with it.
                os.write(fd, b"\n")
            for cp in newer:
                os.write(fd, orjson.dumps(cp.model_dump(mode="json")) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last = newer[-1].sequence
        return len(newer)


def _sequence_of(line: bytes) -> int | None:
    """The ``sequence`` of a checkpoint's JSON line, None when the line is not JSON with an integer one
    (it is then validated, and skipped with a warning, whatever the range)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    seq = obj.get("sequence") if isinstance(obj, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _torn(fd: int) -> bool:
    """Whether the file open at ``fd`` ends inside a line (not empty, its last byte no newline)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
