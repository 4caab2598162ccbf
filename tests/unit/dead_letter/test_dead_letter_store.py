"""The dead-letter store: the directory backend on tmp_path and the S3 backend on moto's in-memory fake
of S3 (`mock_aws`), through the same interface."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from moto import mock_aws

from todo_cqrs.dead_letter.store import (
    DeadLetter,
    DeadLetterStore,
    DirectoryDeadLetterStore,
    S3DeadLetterStore,
    from_settings,
)
from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.settings import settings

BUCKET = "test-dead-letters"
PREFIX = "dead-letters/"
T0 = datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)

# Not UTF-8, with NUL and high bytes: only a lossless store gives these back.
BINARY_DATA = b"\x00\xff\xfe binary \x80 payload"


def dead_letter(event_id: str = "partition:0/offset:7", data: bytes | None = BINARY_DATA, **kw) -> DeadLetter:
    attributes = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/apis/v1/namespaces/todo/kafkasources/todo-events#todo-events",
        "type": "todo.updated.v1",
        "subject": "7",
        "time": "2026-11-27T09:59:59.5Z",
        "datacontenttype": "application/octet-stream",
        "partitionkey": "7",
        "knativeerrordest": "http://project-event.todo.svc.cluster.local",
        "knativeerrorcode": "400",
        "knativeerrordata": base64.b64encode(b'{"error":{"code":"invalid_event"}}').decode(),
    }
    return DeadLetter(attributes, data, **kw)


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's mock_aws: an in-memory fake of S3, with fake credentials so nothing reaches AWS."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield


@pytest.fixture(params=["directory", "s3_on_moto_fake"])
def store(request: pytest.FixtureRequest, tmp_path) -> DeadLetterStore:
    """Each shared behaviour runs on both backends; the S3 one talks to moto's fake, not to AWS."""
    if request.param == "directory":
        return DirectoryDeadLetterStore(tmp_path / "dead-letters")
    request.getfixturevalue("fake_aws")
    return S3DeadLetterStore(BUCKET, PREFIX)


def test_put_then_get_gives_back_every_attribute_and_the_exact_bytes(store: DeadLetterStore) -> None:
    letter = dead_letter(received_at=T0)

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
    key = store.put(dead_letter(data=data))

    assert store.get(key).data == data


def test_keys_sort_by_arrival_time_and_are_unique(store: DeadLetterStore) -> None:
    arrivals = [T0 + timedelta(seconds=s) for s in (30, 0, 10)]
    keys = {at: store.put(dead_letter(received_at=at)) for at in arrivals}
    same_event_again = store.put(dead_letter(received_at=T0))

    listed = store.list()

    assert len(set(listed)) == 4
    assert same_event_again != keys[T0]
    assert [store.get(k).received_at for k in listed] == sorted([*arrivals, T0])


def test_event_ids_with_slashes_make_safe_keys(store: DeadLetterStore) -> None:
    key = store.put(dead_letter(event_id="partition:2/offset:41/../../etc"))

    assert "/" not in key.removeprefix(PREFIX)
    assert store.get(key).id == "partition:2/offset:41/../../etc"


def test_delete_removes_the_letter_and_is_idempotent(store: DeadLetterStore) -> None:
    kept = store.put(dead_letter(event_id="a"))
    gone = store.put(dead_letter(event_id="b"))

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


def test_directory_store_is_created_on_first_put_and_writes_readable_json(tmp_path) -> None:
    store = DirectoryDeadLetterStore(tmp_path / "not" / "yet")
    text_letter = dead_letter(data=b'{"id":7}')

    key = store.put(text_letter)

    document = json.loads((tmp_path / "not" / "yet" / key).read_text())
    assert document["data_text"] == '{"id":7}'
    assert document["attributes"]["knativeerrordest"] == "http://project-event.todo.svc.cluster.local"
    assert [p.name for p in (tmp_path / "not" / "yet").iterdir()] == [key]  # no temporary file left


def test_directory_store_refuses_keys_that_leave_its_directory(tmp_path) -> None:
    (tmp_path / "secret.json").write_text("{}")
    store = DirectoryDeadLetterStore(tmp_path / "dead-letters")
    store.put(dead_letter())

    for key in ("../secret.json", str(tmp_path / "secret.json"), ".hidden.json", ""):
        with pytest.raises(KeyError):
            store.get(key)
        with pytest.raises(KeyError):
            store.delete(key)
    assert (tmp_path / "secret.json").exists()


def test_directory_store_that_cannot_be_written_is_unavailable(tmp_path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    with pytest.raises(DependencyUnavailable):
        DirectoryDeadLetterStore(not_a_directory).put(dead_letter())


def test_s3_store_on_moto_fake_keeps_letters_under_its_prefix_only(fake_aws: None) -> None:
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="elsewhere/x.json", Body=b"{}")
    store = S3DeadLetterStore(BUCKET, PREFIX)

    key = store.put(dead_letter())

    assert key.startswith(PREFIX) and key.endswith(".json")
    assert store.list() == [key]
    assert s3.get_object(Bucket=BUCKET, Key=key)["ContentType"] == "application/json"
    with pytest.raises(KeyError):
        store.get("elsewhere/x.json")


def test_s3_store_on_moto_fake_creates_its_client_once(fake_aws: None) -> None:
    store = S3DeadLetterStore(BUCKET, PREFIX)
    store.put(dead_letter())
    client = store.client

    store.list()

    assert store.client is client


def test_s3_store_on_moto_fake_without_its_bucket_is_unavailable(fake_aws: None) -> None:
    store = S3DeadLetterStore("no-such-bucket", PREFIX)

    with pytest.raises(DependencyUnavailable):
        store.put(dead_letter())
    with pytest.raises(DependencyUnavailable):
        store.list()


def test_from_settings_picks_the_backend_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    def fresh() -> DeadLetterStore:
        settings.cache_clear()
        from_settings.cache_clear()
        return from_settings()

    try:
        monkeypatch.setenv("DEAD_LETTER_STORE", "dir")
        monkeypatch.setenv("DEAD_LETTER_DIR", str(tmp_path))
        local = fresh()
        assert isinstance(local, DirectoryDeadLetterStore) and local.directory == tmp_path

        monkeypatch.setenv("DEAD_LETTER_STORE", "s3")
        monkeypatch.setenv("DEAD_LETTER_BUCKET", "b")
        monkeypatch.setenv("DEAD_LETTER_PREFIX", "p/")
        monkeypatch.setenv("DEAD_LETTER_S3_ENDPOINT", "http://127.0.0.1:9000")
        remote = fresh()
        assert isinstance(remote, S3DeadLetterStore)
        assert (remote.bucket, remote.prefix, remote.endpoint_url) == ("b", "p/", "http://127.0.0.1:9000")
        assert from_settings() is remote

        monkeypatch.setenv("DEAD_LETTER_STORE", "tape")
        with pytest.raises(ValueError):
            fresh()
    finally:
        settings.cache_clear()
        from_settings.cache_clear()


def test_binary_mode_request_becomes_a_letter_with_headers_and_body_as_they_arrived() -> None:
    headers = {
        "Ce-Specversion": "1.0",
        "Ce-Id": "partition:0/offset:3",
        "Ce-Source": "/s",
        "Ce-Type": "dev.knative.kafka.event",
        "Ce-Knativeerrorcode": "500",
        "Content-Type": "application/json",
        "Content-Length": "13",
    }

    letter = DeadLetter.from_http(headers, b'{ "id" : 7 }\n')

    assert letter.attributes == {
        "specversion": "1.0",
        "id": "partition:0/offset:3",
        "source": "/s",
        "type": "dev.knative.kafka.event",
        "knativeerrorcode": "500",
        "datacontenttype": "application/json",
    }
    assert letter.data == b'{ "id" : 7 }\n'
    assert "time" not in letter.attributes


def test_structured_mode_request_becomes_a_letter() -> None:
    envelope = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "knativeerrorcode": "400"}
    headers = {"Content-Type": "application/cloudevents+json"}

    as_json = DeadLetter.from_http(headers, json.dumps({**envelope, "data": {"id": 7}}).encode())
    as_base64 = DeadLetter.from_http(headers, json.dumps({**envelope, "data_base64": "AP8="}).encode())

    assert as_json.attributes == envelope and json.loads(as_json.data or b"") == {"id": 7}
    assert as_base64.data == b"\x00\xff"


def test_a_request_that_is_no_cloud_event_is_refused() -> None:
    with pytest.raises(ValueError):
        DeadLetter.from_http({"Content-Type": "application/json"}, b'{"id": 7}')


def test_original_attributes_drop_only_the_knative_error_extensions() -> None:
    letter = dead_letter()

    original = letter.original_attributes()

    assert not [name for name in original if name.startswith("knativeerror")]
    assert original["partitionkey"] == "7"
    assert len(original) == len(letter.attributes) - 3
