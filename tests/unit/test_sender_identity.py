"""Sender identity on the event receivers (todo_cqrs/sender_identity.py, the contract's "Who may deliver
events"): 401 without or with a bad token, 403 for another subject, 503 while the issuer's keys cannot
be read, each before the body is read; health and metrics open; the issuer's keys fetched again for an
unknown kid, at most once per interval.

Keys are made here. The receivers get them from a key source passed in (its fetches counted), or, for
the wiring of the real functions, from the local issuer (tools/issuer.py) served in this process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import REGISTRY
from starlette.requests import Request
from starlette.responses import Response

from tests.unit.fakes import (
    CREATED,
    assert_error,
    binary_event,
    client_of,
    load_main,
    log_lines,
    todo_data,
)
from tests.unit.fakes_read import FakeReadStore, fake_projection
from todo_cqrs import bootstrap, sender_identity
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.domain.events import check_subject
from todo_cqrs.http import CloudEventSink, HttpFunction, json_response
from todo_cqrs.sender_identity import IssuerKeys, IssuerUnreachable, KeyCache, Policy, SenderIdentity
from todo_cqrs.settings import settings
from tools import issuer as local_issuer

ISSUER = "https://issuer.test"
AUDIENCE = "project-event"
SOURCE = "system:serviceaccount:todo:todo-events-projection-oidc-sources.knative.dev-kafkasource"
STRANGER = "system:serviceaccount:todo:default"
EVENT_HEADERS, EVENT_BODY = binary_event(CREATED, todo_data(7, 1))


# --- keys, tokens, an issuer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    algorithm: Any = (
        jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    )
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


class FakeIssuer:
    """A key source whose JWKS the test sets; counts its fetches; can be unreachable."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.jwks: dict[str, Any] = {"keys": list(keys)}
        self.fetches = 0
        self.unreachable = False

    async def fetch(self) -> Mapping[str, Any]:
        self.fetches += 1
        if self.unreachable:
            raise IssuerUnreachable("GET https://issuer.test/.well-known/openid-configuration: refused")
        return self.jwks


@pytest.fixture
def issuer(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> FakeIssuer:
    return FakeIssuer(public_jwk(rsa_key, "rsa-1"), public_jwk(ec_key, "ec-1"))


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {"iss": ISSUER, "aud": [AUDIENCE], "sub": SOURCE, "iat": now, "nbf": now, "exp": now + 600}
    values.update(changes)
    return {name: value for name, value in values.items() if value is not None}


def signed(key: Any, algorithm: str = "RS256", kid: str | None = "rsa-1", **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**changes), key, algorithm=algorithm, headers=headers)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A JWT assembled by hand (what no library would sign): sign(signing_input) -> signature bytes."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode())) if sign else ''}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- receivers under test -----------------------------------------------------------------------------


class Receiver:
    """A CloudEventSink (project_event's shape) whose handler records what it was given."""

    def __init__(self, check: sender_identity.SenderCheck) -> None:
        self.handled: list[str] = []
        self.sink = CloudEventSink(self._handle, identity=lambda: check)

    async def _handle(self, event: Any, request: Request, body: bytes) -> str:
        self.handled.append(event["id"])
        return "applied"


class Answer:
    def __init__(self, response: Response, body_read: bool) -> None:
        self.status_code = response.status_code
        self.headers = response.headers
        self.content = bytes(response.body)
        self.body_read = body_read

    def json(self) -> Any:
        return json.loads(self.content)


def call(
    app: Any,
    token: str | None = None,
    *,
    method: str = "POST",
    path: str = "/",
    headers: Mapping[str, str] = EVENT_HEADERS,
    body: bytes = EVENT_BODY,
    authorization: str | None = None,
) -> Answer:
    """One request to `app` (an HttpFunction or a CloudEventSink); records whether its body was read."""
    all_headers = dict(headers)
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    if authorization is not None:
        all_headers["authorization"] = authorization
    read = False

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("receiver", 80),
        "client": ("sender", 1234),
        "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
    }
    response = asyncio.run(app(Request(scope, receive)))
    return Answer(response, read)


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("todo_sender_identity_refused_total", {"reason": reason}) or 0.0


def make_identity(
    issuer: FakeIssuer, mode: str = "required", clock: Clock | None = None, now: Any = time.time
) -> SenderIdentity:
    keys = KeyCache(issuer, clock=clock or Clock())
    return SenderIdentity(Policy(mode, ISSUER, AUDIENCE, frozenset({SOURCE})), keys, now=now)


@pytest.fixture
def receiver(issuer: FakeIssuer) -> Receiver:
    return Receiver(make_identity(issuer))


def assert_refused_unread(answer: Answer, receiver: Receiver, status: int, code: str) -> dict[str, Any]:
    error = assert_error(answer, status, code)
    assert not answer.body_read, "the body was read before the sender was refused"
    assert receiver.handled == []
    return error


def assert_401(answer: Answer, receiver: Receiver) -> None:
    assert_refused_unread(answer, receiver, 401, "unauthenticated")
    assert answer.headers["www-authenticate"].startswith(f'Bearer realm="{AUDIENCE}"')


# --- refused ------------------------------------------------------------------------------------------


def test_no_token_is_401_with_a_bearer_challenge_and_the_body_is_never_read(receiver: Receiver) -> None:
    before = refused("missing")

    answer = call(receiver.sink)

    assert_401(answer, receiver)
    assert answer.headers["www-authenticate"] == f'Bearer realm="{AUDIENCE}"'
    assert refused("missing") == before + 1


def test_a_scheme_other_than_bearer_is_401(receiver: Receiver, rsa_key: rsa.RSAPrivateKey) -> None:
    assert_401(call(receiver.sink, authorization=f"Basic {signed(rsa_key)}"), receiver)


def test_a_token_signed_by_another_key_under_the_issuers_kid_is_401(
    receiver: Receiver, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    before = refused("signature")

    answer = call(receiver.sink, signed(other_rsa_key, kid="rsa-1"))

    assert_401(answer, receiver)
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert refused("signature") == before + 1


def test_a_token_signed_by_a_key_the_issuer_does_not_have_is_401(
    receiver: Receiver, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    before = refused("unknown_key")

    assert_401(call(receiver.sink, signed(other_rsa_key, kid="attacker")), receiver)
    assert refused("unknown_key") == before + 1


def test_alg_none_is_401(receiver: Receiver) -> None:
    unsigned = hand_made({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims())
    before = refused("algorithm")

    assert_401(call(receiver.sink, unsigned), receiver)
    assert refused("algorithm") == before + 1


def test_hs256_with_the_issuers_public_key_as_the_secret_is_401(
    receiver: Receiver, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The classic key-confusion attack: the public key (known to all) used as an HMAC secret."""
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = hand_made(
        {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"},
        claims(),
        lambda signing_input: hmac.new(public_pem, signing_input, hashlib.sha256).digest(),
    )

    assert_401(call(receiver.sink, forged), receiver)


def test_an_es256_header_on_an_rsa_key_is_401(receiver: Receiver, ec_key: ec.EllipticCurvePrivateKey) -> None:
    assert_401(call(receiver.sink, signed(ec_key, "ES256", kid="rsa-1")), receiver)


def test_a_token_for_another_audience_is_401_and_logged_naming_both_audiences(
    receiver: Receiver, rsa_key: rsa.RSAPrivateKey, capfd: pytest.CaptureFixture[str]
) -> None:
    before = refused("audience")

    answer = call(receiver.sink, signed(rsa_key, aud=["dead-letter"]))

    assert_401(answer, receiver)
    assert refused("audience") == before + 1
    (line,) = [line for line in log_lines(capfd) if "expected_audience" in line]
    assert line["level"] == "error"
    assert (line["expected_audience"], line["token_audience"]) == (AUDIENCE, ["dead-letter"])


def test_an_expired_token_is_401(receiver: Receiver, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    before = refused("expired")

    assert_401(call(receiver.sink, signed(rsa_key, iat=now - 700, nbf=now - 700, exp=now - 60)), receiver)
    assert refused("expired") == before + 1


def test_a_token_not_valid_yet_is_401(receiver: Receiver, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    before = refused("not_yet_valid")

    assert_401(call(receiver.sink, signed(rsa_key, nbf=now + 600, exp=now + 1200)), receiver)
    assert refused("not_yet_valid") == before + 1


def test_a_token_of_another_issuer_is_401(receiver: Receiver, rsa_key: rsa.RSAPrivateKey) -> None:
    before = refused("issuer")

    assert_401(call(receiver.sink, signed(rsa_key, iss="https://elsewhere.test")), receiver)
    assert refused("issuer") == before + 1


def test_a_token_without_exp_is_401(receiver: Receiver, rsa_key: rsa.RSAPrivateKey) -> None:
    assert_401(call(receiver.sink, signed(rsa_key, exp=None)), receiver)


def test_a_garbled_token_is_401(receiver: Receiver) -> None:
    assert_401(call(receiver.sink, "not.a.jwt"), receiver)
    assert_401(call(receiver.sink, "x" * 10000), receiver)


def test_a_valid_token_of_another_subject_is_403(receiver: Receiver, rsa_key: rsa.RSAPrivateKey) -> None:
    before = refused("subject")

    answer = call(receiver.sink, signed(rsa_key, sub=STRANGER))

    assert_refused_unread(answer, receiver, 403, "forbidden")
    assert refused("subject") == before + 1


def test_the_issuer_unreachable_while_its_keys_are_needed_is_503_retried_not_401(
    issuer: FakeIssuer, rsa_key: rsa.RSAPrivateKey
) -> None:
    issuer.unreachable = True
    receiver = Receiver(make_identity(issuer))

    answer = call(receiver.sink, signed(rsa_key))

    error = assert_refused_unread(answer, receiver, 503, "dependency_unavailable")
    assert "issuer" in error["message"]
    assert int(answer.headers["retry-after"]) >= 1


# --- admitted -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_a_valid_token_of_the_source_is_handled(
    receiver: Receiver, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, algorithm: str
) -> None:
    key, kid = (rsa_key, "rsa-1") if algorithm == "RS256" else (ec_key, "ec-1")

    answer = call(receiver.sink, signed(key, algorithm, kid=kid, aud=AUDIENCE))

    assert (answer.status_code, answer.json()) == (200, {"outcome": "applied"})
    assert receiver.handled == [EVENT_HEADERS["ce-id"]]


def test_health_and_metrics_stay_open_and_other_requests_need_a_token(receiver: Receiver) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        for method in ("GET", "HEAD"):
            assert call(receiver.sink, method=method, path=path, body=b"").status_code == 200, (method, path)
    assert_401(call(receiver.sink, method="POST", path="/metrics"), receiver)
    assert_401(call(receiver.sink, method="GET", path="/"), receiver)


def test_an_http_receiver_refuses_before_its_view_runs_and_keeps_health_open(
    issuer: FakeIssuer, rsa_key: rsa.RSAPrivateKey
) -> None:
    """relay_outbox's (and reconcile's) shape: an HttpFunction with an identity."""
    ran: list[str] = []

    async def relay(request: Request, todo_id: None) -> Response:
        ran.append("relay")
        return json_response(200, {"published": 0})

    identity = make_identity(issuer)
    function = HttpFunction(collection={"POST": relay}, identity=lambda: identity)

    assert_error(call(function, body=b"{}"), 401, "unauthenticated")
    assert_error(call(function, signed(rsa_key, sub=STRANGER), body=b"{}"), 403, "forbidden")
    assert ran == []
    assert call(function, method="GET", path="/healthz", body=b"").status_code == 200
    assert call(function, signed(rsa_key), body=b"{}").status_code == 200
    assert ran == ["relay"]


def test_mode_on_lets_a_request_without_token_through_counted_but_refuses_a_bad_one(
    issuer: FakeIssuer, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    receiver = Receiver(make_identity(issuer, mode="on"))
    anonymous = REGISTRY.get_sample_value("todo_sender_identity_anonymous_total") or 0.0

    assert call(receiver.sink).status_code == 200
    assert REGISTRY.get_sample_value("todo_sender_identity_anonymous_total") == anonymous + 1
    assert_error(call(receiver.sink, signed(other_rsa_key)), 401, "unauthenticated")
    assert receiver.handled == [EVENT_HEADERS["ce-id"]]


def test_a_remembered_token_is_refused_once_it_expires(
    issuer: FakeIssuer, rsa_key: rsa.RSAPrivateKey
) -> None:
    moment = [time.time()]
    identity = make_identity(issuer, now=lambda: moment[0])
    receiver = Receiver(identity)
    token = signed(rsa_key, exp=int(moment[0]) + 60)
    assert call(receiver.sink, token).status_code == 200

    moment[0] += 60 + sender_identity.LEEWAY_S + 1

    assert_error(call(receiver.sink, token), 401, "unauthenticated")


# --- the issuer's keys --------------------------------------------------------------------------------


def test_keys_are_fetched_once_and_again_for_an_unknown_kid_at_most_once_per_interval(
    issuer: FakeIssuer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    receiver = Receiver(make_identity(issuer, clock=clock))
    assert call(receiver.sink, signed(rsa_key)).status_code == 200
    assert call(receiver.sink, signed(rsa_key)).status_code == 200
    assert issuer.fetches == 1

    clock.now += sender_identity.REFRESH_EVERY_S  # the issuer rotates: a new key, a new kid
    issuer.jwks["keys"].append(public_jwk(other_rsa_key, "rsa-2"))
    assert call(receiver.sink, signed(other_rsa_key, kid="rsa-2")).status_code == 200
    assert issuer.fetches == 2

    for kid in ("random-1", "random-2", "random-3"):  # an attacker's kids: no fetch until the interval passed
        assert call(receiver.sink, signed(other_rsa_key, kid=kid)).status_code == 401
    assert issuer.fetches == 2
    clock.now += sender_identity.REFRESH_EVERY_S
    assert call(receiver.sink, signed(other_rsa_key, kid="random-4")).status_code == 401
    assert issuer.fetches == 3


def test_keys_the_issuer_lists_for_hmac_are_never_used(rsa_key: rsa.RSAPrivateKey) -> None:
    secret = {"kty": "oct", "k": b64url(b"a shared secret of thirty-two by"), "kid": "hmac-1"}
    receiver = Receiver(make_identity(FakeIssuer(secret, public_jwk(rsa_key, "rsa-1"))))
    forged = jwt.encode(
        claims(), b"a shared secret of thirty-two by", algorithm="HS256", headers={"kid": "hmac-1"}
    )

    assert_401(call(receiver.sink, forged), receiver)


# --- settings, and the real functions with the local issuer -------------------------------------------


def test_from_settings_is_no_check_when_off_and_refuses_contradictions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(sender_identity.from_settings(settings()), sender_identity.NoCheck)
    for env, complaint in (
        ({"SENDER_IDENTITY": "yes"}, "SENDER_IDENTITY must be one of"),
        ({"SENDER_IDENTITY": "required", "OIDC_AUDIENCE": "x"}, "OIDC_ALLOWED_SUBJECTS"),
    ):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            settings.cache_clear()
            with pytest.raises(ValueError, match=complaint):
                sender_identity.from_settings(settings())
    settings.cache_clear()


@pytest.fixture
def served_issuer(tmp_path: Path) -> Iterator[str]:
    """tools/issuer.py's server on a free port, in this process; its key pair under tmp_path."""
    http = local_issuer.server(0, directory=tmp_path)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_address[1]}"
    http.shutdown()
    http.server_close()


def test_issuer_keys_are_read_through_the_discovery_document(served_issuer: str, tmp_path: Path) -> None:
    jwks = asyncio.run(IssuerKeys(served_issuer).fetch())

    assert [key["kid"] for key in jwks["keys"]] == [local_issuer.jwks(tmp_path)["keys"][0]["kid"]]
    impostor = local_issuer.server(0, directory=tmp_path, issuer="https://issuer.test")
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        with pytest.raises(IssuerUnreachable, match="names issuer"):
            asyncio.run(IssuerKeys(f"http://127.0.0.1:{impostor.server_address[1]}").fetch())
    finally:
        impostor.shutdown()
        impostor.server_close()
    with pytest.raises(IssuerUnreachable):
        asyncio.run(IssuerKeys("http://127.0.0.1:1").fetch())


def test_the_private_key_is_made_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = local_issuer.ensure_key(tmp_path)
    first = path.read_bytes()

    assert local_issuer.ensure_key(tmp_path).read_bytes() == first
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.fixture
def project_event_required(
    monkeypatch: pytest.MonkeyPatch, served_issuer: str
) -> Iterator[tuple[Any, FakeReadStore]]:
    """functions/project_event/main.py built with SENDER_IDENTITY=required (the check bootstrap makes of
    the settings) against the served local issuer, and fakes of the read store and the cache."""
    for name, value in {
        **local_issuer.receiver_env("project-event"),
        "OIDC_ISSUER": served_issuer,
    }.items():
        monkeypatch.setenv(name, value)
    settings.cache_clear()
    read_model = FakeReadStore()
    sink = load_main("project_event").build(fake_projection(read_model), bootstrap.sender_check(settings()))
    with client_of(sink) as client:
        yield client, read_model


def test_project_event_refuses_an_unauthenticated_event_and_applies_the_sources(
    project_event_required: tuple[Any, FakeReadStore], served_issuer: str, tmp_path: Path
) -> None:
    client, read_model = project_event_required

    refused_answer = client.post("/", content=EVENT_BODY, headers=EVENT_HEADERS)
    assert_error(refused_answer, 401, "unauthenticated")
    assert read_model.rows == {}

    token = local_issuer.mint(
        local_issuer.KAFKASOURCE_SUBJECT, "project-event", 60, directory=tmp_path, issuer=served_issuer
    )
    applied = client.post(
        "/", content=EVENT_BODY, headers={**EVENT_HEADERS, "authorization": f"Bearer {token}"}
    )
    assert (applied.status_code, applied.json()) == (200, {"outcome": "applied"})
    assert 7 in read_model.rows
    assert client.get("/metrics").status_code == 200


# --- an event is about the todo its subject names -----------------------------------------------------


def test_an_event_whose_subject_is_not_its_data_id_can_never_apply() -> None:
    check_subject("7", {"id": 7, "version": 1})
    check_subject("7", b'{"id": 7}')
    with pytest.raises(InvalidEvent, match="subject"):
        check_subject("8", {"id": 7, "version": 1})
    with pytest.raises(InvalidEvent, match="subject"):
        check_subject("07", b'{"id": 7}')


def test_project_event_answers_400_to_an_event_about_another_todo_than_its_subject() -> None:
    read_model = FakeReadStore()
    headers, body = binary_event(CREATED, todo_data(7, 1), **{"ce-subject": "8"})
    with client_of(load_main("project_event").build(fake_projection(read_model))) as client:
        answer = client.post("/", content=body, headers=headers)

    assert_error(answer, 400, "invalid_event")
    assert read_model.rows == {}
