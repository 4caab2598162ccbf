"""A local OIDC issuer: what the cluster's service-account issuer is to Knative's sources, for `make run`.

- A key pair under .local/issuer/ (RSA 2048, RS256 like Kubernetes'; the private key 0600), made once.
- `python -m tools.issuer` serves, on 127.0.0.1:8091 (FUNCTIONS_BASE_PORT + 10, OIDC_ISSUER_PORT), the
  discovery document (`/.well-known/openid-configuration`) and the JWKS (`/openid/v1/jwks`), as the
  Kubernetes API server does. Two static documents: the standard library's threaded HTTP server.
- `mint(subject, audience, ttl_s)` signs a token as the cluster would for a source's service account;
  `Tokens` keeps one per audience and renews it before it expires, as Knative's dispatchers do.

The subjects are those a cluster gives the sources (`<source>-oidc-sources.knative.dev-<kind>` in the
functions' namespace, docs/NAMES), so the receivers run with the same OIDC_ALLOWED_SUBJECTS locally as
in a cluster. Local tooling only; never deployed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from todo_cqrs.settings import LOCAL_DIR
from tools.topology import HOST

ISSUER_DIR = LOCAL_DIR / "issuer"
PRIVATE_KEY = "private-key.pem"
ISSUER_PORT = int(
    os.environ.get("OIDC_ISSUER_PORT") or int(os.environ.get("FUNCTIONS_BASE_PORT", "8081")) + 10
)
ISSUER_URL = f"http://{HOST}:{ISSUER_PORT}"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"
ALGORITHM = "RS256"
TOKEN_TTL_S = 3600  # what Knative asks Kubernetes for
RENEW_BEFORE_S = 300  # a cached token is renewed when it has less than this left

NAMESPACE = "todo"
KAFKASOURCE = "todo-events-projection"


def source_subject(name: str, kind: str, namespace: str = NAMESPACE) -> str:
    """The subject of the token Knative makes for a source's OIDC service account."""
    return f"system:serviceaccount:{namespace}:{name}-oidc-sources.knative.dev-{kind}"


KAFKASOURCE_SUBJECT = source_subject(KAFKASOURCE, "kafkasource")
RELAY_TICK_SUBJECT = source_subject("relay-outbox-tick", "pingsource")
RECONCILE_TICK_SUBJECT = source_subject("reconcile-tick", "pingsource")
# Each receiver (its Knative Service name is its audience) and who may deliver to it: its source only.
# (The dead-letter resend delivers as the KafkaSource: knative/ops/dead-letters-resend.yaml.)
SENDERS = {
    "project-event": (KAFKASOURCE_SUBJECT,),
    "dead-letter": (KAFKASOURCE_SUBJECT,),
    "relay-outbox": (RELAY_TICK_SUBJECT,),
    "reconcile": (RECONCILE_TICK_SUBJECT,),
}


def receiver_env(service: str) -> dict[str, str]:
    """The sender-identity settings `make run` gives a receiver; {} for a function that is not one."""
    subjects = SENDERS.get(service)
    if subjects is None:
        return {}
    return {
        "SENDER_IDENTITY": "required",
        "OIDC_ISSUER": ISSUER_URL,
        "OIDC_AUDIENCE": service,
        "OIDC_ALLOWED_SUBJECTS": ",".join(subjects),
    }


# --- the key pair ------------------------------------------------------------------------------------


def ensure_key(directory: Path = ISSUER_DIR) -> Path:
    """The private key's file, made (0600, atomically, once) if missing."""
    path = directory / PRIVATE_KEY
    if path.exists():
        return path
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    partial = directory / f".{PRIVATE_KEY}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    try:
        os.link(partial, path)  # fails if another process made it meanwhile: theirs is kept
    except FileExistsError:
        pass
    finally:
        partial.unlink()
    return path


def private_key(directory: Path = ISSUER_DIR) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(ensure_key(directory).read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{directory / PRIVATE_KEY} is not an RSA private key")
    return key


def key_id(key: rsa.RSAPrivateKey) -> str:
    """A kid from the public key (its DER digest), so a new key pair has a new kid."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def jwks(directory: Path = ISSUER_DIR) -> dict[str, Any]:
    key = private_key(directory)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**public, "kid": key_id(key), "use": "sig", "alg": ALGORITHM}]}


def discovery(issuer: str = ISSUER_URL) -> dict[str, Any]:
    """The fields of Kubernetes' discovery document."""
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_PATH,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [ALGORITHM],
    }


# --- tokens ------------------------------------------------------------------------------------------


def mint(
    subject: str,
    audience: str,
    ttl_s: float = TOKEN_TTL_S,
    *,
    directory: Path = ISSUER_DIR,
    issuer: str = ISSUER_URL,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A token as the cluster's issuer would sign it for `subject`, for `audience`, valid ttl_s."""
    key = private_key(directory)
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": [audience],
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl_s),
        **(extra or {}),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": key_id(key)})


class Tokens:
    """A sender's tokens, one per audience, each renewed when less than RENEW_BEFORE_S remain (as the
    Knative dispatchers cache theirs). Safe across threads."""

    def __init__(self, subject: str, *, ttl_s: float = TOKEN_TTL_S, directory: Path = ISSUER_DIR) -> None:
        self.subject = subject
        self.ttl_s = ttl_s
        self.directory = directory
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def authorization(self, audience: str) -> str:
        """The `Authorization` header value for a request to `audience`."""
        now = time.time()
        with self._lock:
            token, expires = self._tokens.get(audience, ("", 0.0))
            if expires - now < min(RENEW_BEFORE_S, self.ttl_s / 2):
                token = mint(self.subject, audience, self.ttl_s, directory=self.directory)
                self._tokens[audience] = (token, now + self.ttl_s)
        return f"Bearer {token}"

    def headers_for(self, audience: str) -> Callable[[], dict[str, str]]:
        """A maker of a request's headers for `audience` (its token renewed as needed)."""
        return lambda: {"Authorization": self.authorization(audience)}


# --- the server --------------------------------------------------------------------------------------


def _handler(documents: Mapping[str, bytes]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = documents.get(self.path.split("?", 1)[0])
            status = 200 if body is not None else 404
            if body is None:
                body = b'{"error":{"code":"not_found","message":"no such document","details":[]}}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # two static documents: nothing worth a line

    return Handler


def server(
    port: int = ISSUER_PORT, *, directory: Path = ISSUER_DIR, issuer: str | None = None
) -> ThreadingHTTPServer:
    """The issuer's HTTP server, bound (port 0: any free port) and not yet serving. `issuer` defaults
    to its own address."""
    http = ThreadingHTTPServer((HOST, port), BaseHTTPRequestHandler)
    url = issuer or f"http://{HOST}:{http.server_address[1]}"
    documents = {
        DISCOVERY_PATH: json.dumps(discovery(url)).encode(),
        JWKS_PATH: json.dumps(jwks(directory)).encode(),
        "/healthz": b'{"status":"ok"}',
    }
    http.RequestHandlerClass = _handler(documents)
    http.daemon_threads = True
    return http


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.issuer", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve the discovery document and JWKS (the default)")
    serve.add_argument("--port", type=int, default=ISSUER_PORT)
    token = commands.add_parser("token", help="print a token for AUDIENCE, as its event source has it")
    token.add_argument("audience", choices=sorted(SENDERS))
    token.add_argument("--subject", help="default: the receiver's source (OIDC_ALLOWED_SUBJECTS)")
    token.add_argument("--ttl", type=float, default=TOKEN_TTL_S, help="seconds")
    args = parser.parse_args(argv)
    if args.command == "token":
        print(mint(args.subject or SENDERS[args.audience][0], args.audience, args.ttl))
        return 0
    port = getattr(args, "port", ISSUER_PORT)
    http = server(port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=http.serve_forever, name="issuer", daemon=True)
    thread.start()
    print(f"OIDC issuer on http://{HOST}:{port} (key {ISSUER_DIR / PRIVATE_KEY})", file=sys.stderr)
    stop.wait()
    http.shutdown()
    http.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
