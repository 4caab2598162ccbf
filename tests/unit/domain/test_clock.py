"""Time as the API, the events and the databases keep it: UTC, milliseconds, RFC 3339 with a `Z`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from todo_cqrs.domain.clock import as_utc, format_time, naive_utc, parse_time, utc_now

T0 = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)
RFC3339_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def test_time_is_rfc3339_utc_with_milliseconds_and_z() -> None:
    assert format_time(T0) == "2026-11-27T10:00:00.123Z"


def test_time_in_another_zone_is_written_in_utc() -> None:
    moment = datetime(2026, 11, 27, 12, 0, 0, 5000, tzinfo=timezone(timedelta(hours=2)))

    assert format_time(moment) == "2026-11-27T10:00:00.005Z"


def test_time_without_a_zone_is_written_as_utc() -> None:
    assert format_time(T0.replace(tzinfo=None)) == "2026-11-27T10:00:00.123Z"


def test_time_keeps_milliseconds_and_drops_microseconds() -> None:
    assert format_time(T0.replace(microsecond=999999)) == "2026-11-27T10:00:00.999Z"
    assert format_time(T0.replace(microsecond=0)) == "2026-11-27T10:00:00.000Z"


def test_utc_now_is_utc_and_truncated_to_the_millisecond() -> None:
    now = utc_now()

    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert now.microsecond % 1000 == 0
    assert RFC3339_UTC_MS.match(format_time(now))


def test_parse_time_reads_back_what_format_time_wrote() -> None:
    assert parse_time(format_time(T0)) == T0
    assert parse_time("2026-11-27T12:00:00.123+02:00") == T0


def test_parse_time_takes_a_time_without_a_zone_as_utc() -> None:
    assert parse_time("2026-11-27T10:00:00.123") == T0


def test_naive_utc_is_the_utc_wall_time_for_a_datetime_column() -> None:
    in_paris = T0.astimezone(timezone(timedelta(hours=1)))

    assert naive_utc(in_paris) == datetime(2026, 11, 27, 10, 0, 0, 123000)
    assert naive_utc(datetime(2026, 1, 1)) == datetime(2026, 1, 1)


def test_as_utc_reads_a_datetime_column_back_as_an_aware_utc_time() -> None:
    assert as_utc(naive_utc(T0)) == T0 and as_utc(naive_utc(T0)).tzinfo is UTC
    assert as_utc(T0) is T0
