"""Time as the database keeps it: naive UTC datetimes, and epoch seconds for the in-memory parts."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def to_epoch(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp()


def from_epoch(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


def storable_id(value: str) -> bool:
    """Whether an id could be stored at all: a longer one, or one with 4-byte characters that
    MySQL's utf8 columns reject (an error, not a miss), names no row."""
    return 0 < len(value) <= 255 and all(ord(ch) <= 0xFFFF for ch in value)
