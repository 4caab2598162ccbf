"""The dead-letter store: what each backend does of its own (the directory on tmp_path, S3 on moto's
in-memory fake), and reading letters from requests. What every backend and the fake share is in
tests/contract/test_dead_letter_store_contract.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest

from tests.unit.fakes_read import a_dead_letter, moto_s3
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


@pytest.fixture
def fake_aws() -> Iterator[None]:
    with moto_s3(BUCKET):
        yield


def test_directory_store_is_created_on_first_put_and_writes_readable_json(tmp_path) -> None:
    store = DirectoryDeadLetterStore(tmp_path / "not" / "yet")
    text_letter = a_dead_letter(data=b'{"id":7}')

    key = store.put(text_letter)

    document = json.loads((tmp_path / "not" / "yet" / key).read_text())
    assert document["data_text"] == '{"id":7}'
    assert document["attributes"]["knativeerrordest"] == "http://project-event.todo.svc.cluster.local"
    assert [p.name for p in (tmp_path / "not" / "yet").iterdir()] == [key]  # no temporary file left


def test_directory_store_refuses_keys_that_leave_its_directory(tmp_path) -> None:
    (tmp_path / "secret.json").write_text("{}")
    store = DirectoryDeadLetterStore(tmp_path / "dead-letters")
    store.put(a_dead_letter())

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
        DirectoryDeadLetterStore(not_a_directory).put(a_dead_letter())


def test_s3_store_on_moto_fake_keeps_letters_under_its_prefix_only(fake_aws: None) -> None:
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="elsewhere/x.json", Body=b"{}")
    store = S3DeadLetterStore(BUCKET, PREFIX)

    key = store.put(a_dead_letter())

    assert key.startswith(PREFIX) and key.endswith(".json")
    assert store.list() == [key]
    assert s3.get_object(Bucket=BUCKET, Key=key)["ContentType"] == "application/json"
    with pytest.raises(KeyError):
        store.get("elsewhere/x.json")


def test_s3_store_on_moto_fake_creates_its_client_once(fake_aws: None) -> None:
    store = S3DeadLetterStore(BUCKET, PREFIX)
    store.put(a_dead_letter())
    client = store.client

    store.list()

    assert store.client is client


def test_s3_store_on_moto_fake_without_its_bucket_is_unavailable(fake_aws: None) -> None:
    store = S3DeadLetterStore("no-such-bucket", PREFIX)

    with pytest.raises(DependencyUnavailable):
        store.put(a_dead_letter())
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
    letter = a_dead_letter()

    original = letter.original_attributes()

    assert not [name for name in original if name.startswith("knativeerror")]
    assert original["partitionkey"] == "7"
    assert len(original) == len(letter.attributes) - 3
