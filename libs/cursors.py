"""Opaque cursors of the lists the HTTP APIs page through (the registry's models, versions and datasets,
training's jobs, monitoring's drift windows): the URL-safe base64, unpadded, of a JSON array holding the
list's name and then the sort key of the last row of a page. Pure: a service's domain decodes its own
lists' cursors with :func:`cursor_position` and checks the key's values against what its table can hold.

The list's name is inside so that one list's cursor is refused by another sorted by a key of the same
shape (the registry's versions and datasets, both by name and number), where it would have been read as a
position in the wrong list."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from libs.errors import InvalidInput


def encode_cursor(of: str, position: Sequence[Any]) -> str:
    """An opaque cursor for the row after ``position`` (the sort key of the page's last row) in the list
    ``of``; a datetime in the key is written in RFC 3339 with its offset (:func:`cursor_time` reads it)."""
    return base64.urlsafe_b64encode(orjson.dumps([of, *position])).decode().rstrip("=")


def cursor_not_valid() -> InvalidInput:
    """422 for a cursor no list of the service gave (or one whose key no row could have)."""
    return InvalidInput("cursor is not valid: pass the next_cursor of a previous page", field="cursor")


def cursor_of_another_list() -> InvalidInput:
    """422 for a cursor another list gave: read as this one's, it would be a position in the wrong rows."""
    return InvalidInput("cursor does not belong to this list: pass its own next_cursor", field="cursor")


def cursor_position(cursor: str, of: str, size: int, *, lists: Collection[str]) -> list[Any]:
    """The ``size`` values of the sort key inside a cursor of the list ``of``; 422 when it is not one
    :func:`encode_cursor` made for a list in ``lists`` (the service's), or when it was made for another of
    them. The values are as JSON read them: the caller checks their types and ranges."""
    try:
        # validate=True: a character outside the URL-safe alphabet is an error, not skipped.
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        position = orjson.loads(raw)
    except (binascii.Error, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise cursor_not_valid() from exc
    if not isinstance(position, list) or not position or position[0] not in lists:
        # Not made by encode_cursor (or made by a registry from before cursors named their list).
        raise cursor_not_valid()
    if position[0] != of or len(position) != size + 1:
        raise cursor_of_another_list()
    return position[1:]


def cursor_time(value: Any) -> datetime:
    """A datetime of a cursor's key, as :func:`encode_cursor` wrote it, in UTC; 422 for anything else (a
    time without its offset could not be compared with a ``timestamptz``)."""
    if type(value) is not str:
        raise cursor_of_another_list()
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError(value)
        # In UTC, as asyncpg would send it: an offset taking it past year 1 or 9999 fails here, not there.
        return moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise cursor_not_valid() from exc
