"""Time as the todo's API, its events and its databases keep it: UTC, milliseconds, RFC 3339 with a `Z`.

The moments of a change (`updated_at`, an event's `time`) come from the write database's clock inside
the change's transaction (see adapters/write_store.py), never from a pod's clock.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Now in UTC, truncated to the millisecond the API and the databases keep."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a `Z`, as the contract shows."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


def parse_time(text: str) -> datetime:
    """An RFC 3339 time; one without a zone is taken as UTC, whatever the machine's zone."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def naive_utc(moment: datetime) -> datetime:
    """For DATETIME columns, which hold UTC without a zone."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def as_utc(moment: datetime) -> datetime:
    """A DATETIME column's value (UTC, no zone) as an aware datetime."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
