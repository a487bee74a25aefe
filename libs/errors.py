"""Typed errors of the core. Each carries the HTTP status it maps to at the edge and a clear message."""

from __future__ import annotations

import codecs
import json
from typing import Any


class DomainError(Exception):
    """Base of errors a caller can act on; ``extra`` adds machine-readable details to the response."""

    status: int = 400
    code: str = "bad-request"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(DomainError):
    status = 404
    code = "not-found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class InvalidInput(DomainError):
    status = 422
    code = "invalid-input"


class PayloadTooLarge(DomainError):
    status = 413
    code = "payload-too-large"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class Unavailable(DomainError):
    status = 503
    code = "unavailable"


class TooManyRequests(DomainError):
    """429: the caller may try again after ``retry_after_s`` seconds (the answer's Retry-After)."""

    status = 429
    code = "too-many-requests"

    def __init__(self, message: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **extra)
        self.retry_after_s = retry_after_s


class Outage(OSError):
    """A dependency (the database, the artifact store) failed, and the code that talks to it judged it the
    dependency's fault, never the caller's: whatever the error underneath (a unix socket that is gone while
    Postgres restarts is a FileNotFoundError), the bus retries the event without limit
    (``libs.bus.core.transience``) and HTTP answers 503. An OSError, so code that answers OSErrors still does.
    """


class RepeatedKey(ValueError):
    """A JSON object or a YAML mapping names one key twice (``line``: where, when the reader knows)."""

    def __init__(self, key: str, line: int | None = None) -> None:
        super().__init__(key)
        self.key = key
        self.line = line


def keys_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook`` for ``json.loads`` that raises :class:`RepeatedKey` for an object naming a key
    twice: the readers keep the last, where another reader on the way may keep the first."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen.add(key)
    return obj


def json_text(body: bytes, **extra: Any) -> str:
    """A JSON body's text: UTF-8 without a byte order mark, as RFC 8259 (section 8.1) has JSON between
    systems, else :class:`InvalidInput` saying what it is instead (``extra`` adds to it). Python's json reads
    bytes in UTF-16 and UTF-32 too, skips a leading byte order mark and lets in the bytes of a lone surrogate
    (ED A0 80), none of which another reader on the way (orjson, a proxy, an audit log) may read the same."""
    if body.startswith(codecs.BOM_UTF8):
        raise InvalidInput(
            "the JSON body starts with a byte order mark (bytes EF BB BF): send it as UTF-8 without one",
            **extra,
        )
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        named = encoding.upper().replace("-BE", "BE").replace("-LE", "LE")
        raise InvalidInput(f"the JSON body reads as {named}, not UTF-8: send it as UTF-8", **extra)
    try:
        return body.decode()
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"the JSON body is not UTF-8 (byte 0x{body[exc.start]:02x} at {exc.start} cannot be decoded): "
            "send it as UTF-8",
            **extra,
        ) from None


def shown(text: str, chars: int = 40) -> str:
    """``text`` as a message quotes it: its repr, or when it is longer than ``chars`` characters the repr of
    its start, then "…" and its length, so a name of 12,000 characters does not make a message as long."""
    if len(text) <= chars:
        return repr(text)
    return f"{text[:chars]!r}… ({len(text):,} characters)"
