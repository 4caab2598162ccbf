"""The dead-letter store's contract: the same cases against the in-memory fake the unit tests use
(tests/unit/fakes_read.FakeDeadLetterStore), the directory store (on tmp_path) and the S3 store (on
moto's in-memory S3, no AWS): lossless round trips, keys in arrival order, idempotent deletes, unknown
keys, and a store that cannot be written.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.unit.fakes_read import BINARY_DATA, FakeDeadLetterStore, a_dead_letter, moto_s3
from todo_cqrs.dead_letter.store import DeadLetterStore, DirectoryDeadLetterStore, S3DeadLetterStore
from todo_cqrs.domain.errors import DependencyUnavailable

BUCKET = "test-dead-letters"
PREFIX = "dead-letters/"
T0 = datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(params=["fake", "directory", "s3_on_moto"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeadLetterStore]:
    if request.param == "fake":
        yield FakeDeadLetterStore()
    elif request.param == "directory":
        yield DirectoryDeadLetterStore(tmp_path / "dead-letters")
    else:
        with moto_s3(BUCKET):
            yield S3DeadLetterStore(BUCKET, PREFIX)


def test_put_then_get_gives_back_every_attribute_and_the_exact_bytes(store: DeadLetterStore) -> None:
    letter = a_dead_letter(received_at=T0)

    key = store.put(letter)

    assert store.get(key) == letter
    assert store.get(key).data == BINARY_DATA
    assert store.get(key).attributes["knativeerrorcode"] == "400"


@pytest.mark.parametrize(
    "data",
    [b'{"id": 7, "version":3,"title":"caf\xc3\xa9 \\u00e9"}', b"", None],
    ids=["utf8_json_kept_byte_for_byte", "empty_body", "no_data"],
)
def test_round_trip_is_lossless_for_text_and_empty_data(store: DeadLetterStore, data: bytes | None) -> None:
    key = store.put(a_dead_letter(data=data))

    assert store.get(key).data == data


def test_keys_sort_by_arrival_time_and_are_unique(store: DeadLetterStore) -> None:
    arrivals = [T0 + timedelta(seconds=s) for s in (30, 0, 10)]
    keys = {at: store.put(a_dead_letter(received_at=at)) for at in arrivals}
    same_event_again = store.put(a_dead_letter(received_at=T0))

    listed = store.list()

    assert len(set(listed)) == 4
    assert same_event_again != keys[T0]
    assert [store.get(k).received_at for k in listed] == sorted([*arrivals, T0])


def test_event_ids_with_slashes_make_safe_keys(store: DeadLetterStore) -> None:
    key = store.put(a_dead_letter(event_id="partition:2/offset:41/../../etc"))

    assert "/" not in key.removeprefix(PREFIX)
    assert store.get(key).id == "partition:2/offset:41/../../etc"


def test_delete_removes_the_letter_and_is_idempotent(store: DeadLetterStore) -> None:
    kept = store.put(a_dead_letter(event_id="a"))
    gone = store.put(a_dead_letter(event_id="b"))

    store.delete(gone)
    store.delete(gone)

    assert store.list() == [kept]
    with pytest.raises(KeyError):
        store.get(gone)


def test_get_of_an_unknown_key_raises_key_error(store: DeadLetterStore) -> None:
    with pytest.raises(KeyError):
        store.get(PREFIX + "20260101T000000.000000Z-nothing-00000000.json")


def test_empty_store_lists_nothing(store: DeadLetterStore) -> None:
    assert store.list() == []


@pytest.fixture(params=["fake", "directory", "s3_on_moto"])
def unwritable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeadLetterStore]:
    """A store that cannot keep a letter: the fake's flag, a file where the directory should be, a
    bucket that does not exist."""
    if request.param == "fake":
        yield FakeDeadLetterStore(unreachable=True)
    elif request.param == "directory":
        not_a_directory = tmp_path / "file"
        not_a_directory.write_text("")
        yield DirectoryDeadLetterStore(not_a_directory)
    else:
        with moto_s3(BUCKET):
            yield S3DeadLetterStore("no-such-bucket", PREFIX)


def test_a_store_that_cannot_keep_the_letter_is_dependency_unavailable(unwritable: DeadLetterStore) -> None:
    with pytest.raises(DependencyUnavailable):
        unwritable.put(a_dead_letter())
