"""``ce_time`` texts the bus and the audit trail must read alike: RFC 3339 date-times and other texts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

ACCEPTED: list[tuple[str, datetime]] = [
    ("2025-03-01T12:00:00Z", datetime(2025, 3, 1, 12, tzinfo=UTC)),
    ("2025-03-01T12:00:00.250000Z", datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)),
    # RFC 3339 §5.6: 'T' and 'Z' may be lower case.
    ("2025-03-01t12:00:00z", datetime(2025, 3, 1, 12, tzinfo=UTC)),
    ("2025-03-01T12:00:00z", datetime(2025, 3, 1, 12, tzinfo=UTC)),
    ("2025-03-01t12:00:00+01:00", datetime(2025, 3, 1, 11, tzinfo=UTC)),
    ("2025-03-01T12:00:00.5-02:30", datetime(2025, 3, 1, 14, 30, 0, 500000, tzinfo=UTC)),
    ("2025-03-01T12:00:00-00:00", datetime(2025, 3, 1, 12, tzinfo=UTC)),  # UTC, local offset unknown
    # Any number of fraction digits (Go and Java write nanoseconds); datetime keeps microseconds.
    ("2025-03-01T12:00:00.123456789Z", datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)),
    ("2025-03-01T12:00:00.1Z", datetime(2025, 3, 1, 12, 0, 0, 100000, tzinfo=UTC)),
    ("2024-02-29T00:00:00+23:59", datetime(2024, 2, 29, tzinfo=timezone(timedelta(hours=23, minutes=59)))),
    # A leap second, at 23:59 UTC: read as the last microsecond before the next minute.
    ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ("2017-01-01T00:59:60.5+01:00", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
]
"""RFC 3339 date-times, and the instant each names."""

REFUSED: list[str] = [
    "yesterday",
    "",  # present, but empty
    # ISO 8601 that RFC 3339 is not.
    "2025-03-01 12:00:00Z",  # a space for the T
    "20250301T120000Z",  # basic format
    "2025-03-01T12:00Z",  # no seconds
    "2025-03-01T12Z",
    "2025-W09-6T12:00:00Z",  # a week date
    "2025-03-01T12:00:00,5Z",  # a decimal comma
    "2025-03-01T12:00:00.Z",  # a point without digits
    "2025-03-01T12:00:00+0100",  # an offset without its colon
    "2025-03-01T12:00:00+01",
    "2025-03-01T12:00:00+01:00:30",  # an offset with seconds
    # No UTC offset, or a date only.
    "2025-03-01T12:00:00",
    "2025-03-01T12:00:00.5",
    "2025-03-01",
    # Out of range.
    "2025-02-29T12:00:00Z",
    "2025-03-01T24:00:00Z",
    "2025-03-01T12:60:00Z",
    "2025-03-01T12:59:60Z",  # a leap second is at 23:59 UTC only
    "2025-03-01T12:00:00+24:00",
    "2025-03-01T12:00:00+01:60",
    "0000-01-01T00:00:00Z",
    # No UTC form: before year 1 or after 9999, in UTC.
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:00:00-05:00",
    # Not ASCII digits, or more than the date-time.
    "2025-03-01T12:00:0\u0661Z",
    "2025-03-01T12:00:00Z\n",
    " 2025-03-01T12:00:00Z",
    "2025-03-01T12:00:00ZZ",
]
"""Texts that are not RFC 3339 date-times (or have no UTC form)."""
