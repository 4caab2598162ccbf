"""Re-send dead letters to project_event after a fix, as the binary-mode CloudEvents they were.

Only letters that project_event could not take are re-sent there: a letter whose `knativeerrordest`
names another destination (or none) is kept, with the reason. With sender identity on, the requests
carry a token (`authorization`), as the KafkaSource's do."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from todo_cqrs.dead_letter.store import DeadLetter, DeadLetterStore

RESEND_TIMEOUT_S = 10.0
PROJECT_EVENT_SERVICE = "project-event"  # its Knative Service: knativeerrordest names it in a cluster


@dataclass
class ResendReport:
    """What a resend did: letters delivered (and deleted) and letters kept, with the reason for each."""

    sent: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # key -> why it is still there

    def __str__(self) -> str:
        return f"sent {len(self.sent)}, kept {len(self.kept)}"


def as_request(letter: DeadLetter) -> tuple[dict[str, str], bytes | None]:
    """The headers and body of the original event in binary mode, without Knative's error extensions."""
    attributes = letter.original_attributes()
    event = CloudEvent(attributes, letter.data)
    if "time" not in attributes:
        del event["time"]  # the SDK stamps a time on events without one; the original had none
    # The stored data is the exact body: pass it through instead of letting the SDK re-encode it.
    headers, body = to_binary(event, data_marshaller=lambda data: data)
    return headers, body


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


def dead_lettered_by(letter: DeadLetter, url: str) -> bool:
    """The letter failed at project_event: its knativeerrordest is `url`'s origin, or an address of the
    project-event Service (`project-event`, `project-event.<namespace>[.svc.cluster.local]`)."""
    destination = letter.error_dest
    if not destination:
        return False
    host = _origin(destination)[1]
    return _origin(destination) == _origin(url) or host.split(".", 1)[0] == PROJECT_EVENT_SERVICE


def resend(
    store: DeadLetterStore,
    url: str,
    keys: Iterable[str] | None = None,
    timeout_s: float = RESEND_TIMEOUT_S,
    authorization: Callable[[], str] | None = None,
) -> ResendReport:
    """POST each letter (all, oldest first, or only `keys`) that project_event could not take to url;
    delete each one only after a 2xx. `authorization`: the Authorization header's value, per request."""
    report = ResendReport()
    with requests.Session() as session:
        for key in store.list() if keys is None else keys:
            try:
                letter = store.get(key)
            except KeyError:
                report.kept[key] = "no such dead letter"
                continue
            if not dead_lettered_by(letter, url):
                where = letter.error_dest or "no knativeerrordest"
                report.kept[key] = (
                    f"not dead-lettered by {PROJECT_EVENT_SERVICE} ({where}): not re-sent there"
                )
                continue
            headers, body = as_request(letter)
            if authorization is not None:
                headers["Authorization"] = authorization()
            try:
                response = session.post(url, headers=headers, data=body, timeout=timeout_s)
            except requests.RequestException as exc:
                report.kept[key] = f"not delivered: {exc.__class__.__name__}: {exc}"
                continue
            if 200 <= response.status_code < 300:
                store.delete(key)
                report.sent.append(key)
            else:
                report.kept[key] = f"answered {response.status_code}: {response.text[:200]}"
    return report
