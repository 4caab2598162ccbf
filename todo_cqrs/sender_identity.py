"""Sender identity: only the event source may deliver to an event receiver (project_event, dead_letter,
relay_outbox, reconcile). The contract's "Who may deliver events".

With Knative Eventing's `authentication-oidc` on, a KafkaSource or PingSource whose sink has an
`audience` sends `Authorization: Bearer <JWT>`: a token of its own service account
(`system:serviceaccount:<ns>:<name>`) issued by the cluster's OIDC issuer for that audience. Knative
enforces EventPolicy only at receivers it owns; a Knative Service must verify the token itself, here:

- the signature, RS256 or ES256 only (never `none`, never HMAC), with a key of the issuer's JWKS
  (found through `{OIDC_ISSUER}/.well-known/openid-configuration`);
- `iss` equal to OIDC_ISSUER, `aud` naming OIDC_AUDIENCE (the receiver's own), `exp`/`nbf` with a
  small leeway; then `sub` in OIDC_ALLOWED_SUBJECTS.

No token or a bad one: 401 with `WWW-Authenticate: Bearer`; a valid token of another subject: 403.
Both before the body is read, so nothing changes. The issuer unreachable while its keys are needed:
503, which the dispatcher retries (a 401/403 it dead-letters at once, without retrying: a receiver
whose audience is wrong sends every event to the dead-letter sink, so that is counted and logged
loudly, naming both audiences).

SENDER_IDENTITY: `off` (no check), `on` (a presented token must be valid; a request without one is
let through and counted, for a rollout), `required`.

Keys are cached and fetched again only for a `kid` the cache does not know, at most once per
REFRESH_EVERY_S (random kids cannot make a receiver hammer the issuer). In a cluster the discovery
document and JWKS are read with the pod's service-account token, over TLS verified by the cluster's CA
alone (OIDC_TOKEN_FILE, OIDC_CA_FILE; used when both files exist). A token that passed every check is
remembered until it expires, so the same dispatcher token costs one dictionary lookup per event.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import jwt
from prometheus_client import Counter
from starlette.requests import Request

from todo_cqrs import logs
from todo_cqrs.domain import errors
from todo_cqrs.http import SenderCheck
from todo_cqrs.settings import Settings

MODES = ("off", "on", "required")
ALGORITHMS = ("RS256", "ES256")  # asymmetric only: what Kubernetes issues; never none, never HMAC
LEEWAY_S = 10.0
REFRESH_EVERY_S = 30.0  # at most one JWKS fetch this often for unknown kids
RETRY_FAILED_FETCH_S = 1.0  # after a failed fetch, the next request that needs keys tries again after this
FETCH_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_TOKEN_CHARS = 8192
VERIFIED_TOKENS_KEPT = 256
DISCOVERY_PATH = "/.well-known/openid-configuration"
REFUSAL_REASONS = (
    "missing", "malformed", "algorithm", "unknown_key", "signature", "issuer", "audience",
    "expired", "not_yet_valid", "claims", "subject", "issuer_unreachable",
)  # fmt: skip

refusals = Counter(
    "todo_sender_identity_refused",
    "Deliveries refused by sender identity, by reason (audience: the receiver's OIDC_AUDIENCE is not "
    "the token's: every event goes to the dead-letter sink)",
    ["reason"],
)
accepted = Counter("todo_sender_identity_accepted", "Deliveries whose sender identity was verified")
anonymous = Counter(
    "todo_sender_identity_anonymous", "Deliveries without a token let through (SENDER_IDENTITY=on)"
)


class NoCheck:
    """SENDER_IDENTITY=off: everyone may deliver."""

    async def admit(self, request: Request) -> None:
        return None


# --- the issuer's keys ---------------------------------------------------------------------------------


class IssuerUnreachable(Exception):
    """The discovery document or the JWKS could not be read (or made no sense)."""


class KeySource(Protocol):
    """Where the issuer's JSON Web Key Set comes from."""

    async def fetch(self) -> Mapping[str, Any]: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the service-account token elsewhere: refused."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise IssuerUnreachable(f"{req.full_url} redirects to {newurl}; not followed")


class IssuerKeys:
    """The JWKS of an OIDC issuer: its discovery document names `jwks_uri`. Blocking reads in a worker
    thread. With the CA and token files present, TLS is verified with that CA alone and the token is
    presented (the Kubernetes API server serves its keys to service accounts)."""

    def __init__(self, issuer: str, *, ca_file: str = "", token_file: str = "") -> None:
        self.issuer = issuer.rstrip("/")
        self.ca_file = ca_file
        self.token_file = token_file

    async def fetch(self) -> Mapping[str, Any]:
        return await asyncio.to_thread(self._fetch)

    def _fetch(self) -> Mapping[str, Any]:
        discovery = self._get_json(self.issuer + DISCOVERY_PATH)
        if discovery.get("issuer", self.issuer).rstrip("/") != self.issuer:
            raise IssuerUnreachable(
                f"the discovery document names issuer {discovery.get('issuer')!r}, not OIDC_ISSUER "
                f"{self.issuer!r}: set OIDC_ISSUER to the cluster's service-account issuer"
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise IssuerUnreachable(f"the discovery document has no usable jwks_uri: {jwks_uri!r}")
        return self._get_json(jwks_uri)

    def _in_cluster(self) -> bool:
        return bool(self.ca_file and self.token_file) and all(
            os.path.isfile(path) for path in (self.ca_file, self.token_file)
        )

    def _get_json(self, url: str) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        handlers: list[Any] = [_NoRedirect()]
        if url.startswith("https://"):
            if self._in_cluster():
                context = ssl.create_default_context(cafile=self.ca_file)
                with open(self.token_file) as f:  # read each time: a projected token is rotated
                    headers["Authorization"] = f"Bearer {f.read().strip()}"
            else:
                context = ssl.create_default_context()
            handlers.append(urllib.request.HTTPSHandler(context=context))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=FETCH_TIMEOUT_S) as answer:
                body = answer.read(MAX_DOCUMENT_BYTES + 1)
        except IssuerUnreachable:
            raise
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, TLS failures
            raise IssuerUnreachable(f"GET {url}: {exc}") from exc
        if len(body) > MAX_DOCUMENT_BYTES:
            raise IssuerUnreachable(f"GET {url}: larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise IssuerUnreachable(f"GET {url}: not JSON") from exc
        if not isinstance(document, dict):
            raise IssuerUnreachable(f"GET {url}: not a JSON object")
        return document


def usable_keys(jwks: Mapping[str, Any]) -> dict[str | None, jwt.PyJWK]:
    """The signing keys of a JWKS that verify RS256 or ES256, by kid (others are skipped)."""
    found: dict[str | None, jwt.PyJWK] = {}
    for entry in jwks.get("keys") or []:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if key.algorithm_name in ALGORITHMS:
            found[entry.get("kid")] = key
    return found


class KeyCache:
    """The issuer's keys, fetched on first need and again for a kid they lack: at most once per
    `refresh_every_s`, one fetch at a time."""

    def __init__(
        self,
        source: KeySource,
        *,
        refresh_every_s: float = REFRESH_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._refresh_every_s = refresh_every_s
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._next_fetch_at = float("-inf")
        self._failure: str | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self.fetches = 0
        self.generation = 0  # bumped when the keys change: what was verified with older keys is re-verified

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:  # a token without kid: only an issuer with one key can have signed it unambiguously
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key named kid; None when the issuer does not have it. Raises IssuerUnreachable when the
        keys are needed and cannot be read."""
        found = self._find(kid)
        if found is not None:
            return found
        async with self._lock():
            found = self._find(kid)  # fetched meanwhile by the request that held the lock
            if found is not None:
                return found
            now = self._clock()
            if now < self._next_fetch_at:
                if self._failure is not None:
                    raise IssuerUnreachable(self._failure)
                return None
            self.fetches += 1
            try:
                keys = usable_keys(await self._source.fetch())
                if not keys:
                    raise IssuerUnreachable("the issuer's JWKS has no RS256 or ES256 signing key")
            except Exception as exc:
                self._failure = str(exc) if isinstance(exc, IssuerUnreachable) else repr(exc)
                self._next_fetch_at = now + RETRY_FAILED_FETCH_S
                raise IssuerUnreachable(self._failure) from exc
            self._failure = None
            self._next_fetch_at = now + self._refresh_every_s
            if keys.keys() != self._keys.keys():
                self.generation += 1
            self._keys = keys
            return self._find(kid)


# --- the check -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """Who may deliver to this receiver."""

    mode: str
    issuer: str
    audience: str
    subjects: frozenset[str]
    leeway_s: float = LEEWAY_S
    receiver: str = "todo"  # the function's name, in the log line of a token for another audience


class SenderIdentity:
    """Verifies the Bearer token of every delivery to one receiver (see the module's docstring)."""

    def __init__(self, policy: Policy, keys: KeyCache, *, now: Callable[[], float] = time.time) -> None:
        if policy.mode not in ("on", "required"):
            raise ValueError(f"SenderIdentity checks in mode on or required, not {policy.mode!r}")
        self.policy = policy
        self.keys = keys
        for reason in REFUSAL_REASONS:  # every series at 0 from the start, for alerts on their increase
            refusals.labels(reason)
        self._now = now
        self._challenge = f'Bearer realm="{policy.audience}"'
        # Tokens that passed every check: token -> (subject, nbf, exp, generation of the keys).
        self._verified: dict[str, tuple[str, float, float, int]] = {}

    async def admit(self, request: Request) -> None:
        """Returns when the request may be read; raises Unauthenticated (401), Forbidden (403) or
        DependencyUnavailable (503, the issuer unreachable)."""
        header = request.headers.get("authorization")
        if header is None:
            if self.policy.mode == "required":
                self._refuse("missing", "this receiver needs Authorization: Bearer <token> of its source")
            anonymous.inc()
            logs.annotate(sender=None)
            return
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._refuse("malformed", "Authorization must be: Bearer <token>")
        logs.annotate(sender=await self.verify(token.strip()))

    async def verify(self, token: str) -> str:
        """The token's subject once every check passed; raises as `admit` does."""
        now = self._now()
        remembered = self._verified.get(token)
        if remembered is not None:
            subject, not_before, expires, generation = remembered
            leeway = self.policy.leeway_s
            if generation == self.keys.generation and not_before - leeway <= now <= expires + leeway:
                accepted.inc()
                return subject
            del self._verified[token]
        claims = await self._claims(token)
        subject = claims["sub"]
        if subject not in self.policy.subjects:
            refusals.labels("subject").inc()
            logs.annotate(identity_refused="subject", token_subject=subject[:200])
            raise errors.Forbidden(f"{subject[:200]!r} may not deliver to {self.policy.audience}")
        if len(self._verified) >= VERIFIED_TOKENS_KEPT:
            self._verified.clear()
        not_before = float(claims.get("nbf") or 0)
        self._verified[token] = (subject, not_before, float(claims["exp"]), self.keys.generation)
        accepted.inc()
        return subject

    async def _claims(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_CHARS:
            self._refuse("malformed", f"the token is longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            self._refuse("malformed", "the token is not a JWT")
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ALGORITHMS:
            self._refuse("algorithm", f"the token's alg must be one of {', '.join(ALGORITHMS)}")
        if kid is not None and not isinstance(kid, str):
            self._refuse("malformed", "the token's kid is not a string")
        try:
            key = await self.keys.key(kid)
        except IssuerUnreachable as exc:
            refusals.labels("issuer_unreachable").inc()
            raise errors.DependencyUnavailable(
                "the OIDC issuer's keys cannot be read", cause=exc, retry_after_s=1
            ) from exc
        if key is None:
            self._refuse("unknown_key", "the token is not signed by a key of the issuer")
        if key.algorithm_name != algorithm:
            self._refuse("algorithm", "the token's alg does not match its key")
        claims = self._decode(token, key, algorithm)
        self._check_audience(claims)
        return claims

    def _decode(self, token: str, key: jwt.PyJWK, algorithm: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                issuer=self.policy.issuer,
                # aud is checked after the signature, by hand: a mismatch is logged with both values.
                # The times too, on this check's clock (the one the remembered tokens are held to).
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "iss", "aud", "sub"],
                },
            )
        except jwt.InvalidIssuerError:
            self._refuse("issuer", f"the token is not issued by {self.policy.issuer}")
        except jwt.MissingRequiredClaimError as exc:
            self._refuse("claims", f"the token lacks a claim: {exc.claim}")
        except jwt.InvalidSignatureError:
            self._refuse("signature", "the token's signature does not verify")
        except jwt.PyJWTError:
            self._refuse("malformed", "the token cannot be read")
        if not isinstance(claims.get("sub"), str):
            self._refuse("claims", "the token's sub is not a string")
        expires, not_before = claims["exp"], claims.get("nbf", 0)
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in (expires, not_before)):
            self._refuse("claims", "the token's exp and nbf must be numbers")
        now, leeway = self._now(), self.policy.leeway_s
        if now > expires + leeway:
            self._refuse("expired", "the token has expired")
        if now < not_before - leeway:
            self._refuse("not_yet_valid", "the token is not valid yet")
        return claims

    def _check_audience(self, claims: Mapping[str, Any]) -> None:
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience
        if isinstance(audiences, list) and self.policy.audience in audiences:
            return
        # A token the issuer signed, for another audience: the sink's audience and this receiver's
        # OIDC_AUDIENCE differ. Every event will be dead-lettered: say so loudly, with both values.
        logs.write(
            {
                "function": self.policy.receiver,
                "level": "error",
                "msg": "sender identity: the token is for another audience; every delivery is refused "
                "(401) and the KafkaSource dead-letters it without retrying. Make the source's "
                "sink.audience and this receiver's OIDC_AUDIENCE the same.",
                "expected_audience": self.policy.audience,
                "token_audience": audience,
                "token_subject": claims.get("sub"),
            }
        )
        self._refuse("audience", f"the token is not for audience {self.policy.audience}")

    def _refuse(self, reason: str, message: str) -> NoReturn:
        refusals.labels(reason).inc()
        logs.annotate(identity_refused=reason)
        challenge = self._challenge
        if reason != "missing":
            challenge += ', error="invalid_token"'
        raise errors.Unauthenticated(message, challenge)


def from_settings(config: Settings) -> SenderCheck:
    """The check SENDER_IDENTITY and the OIDC_* settings describe; ValueError when they contradict."""
    mode = config.sender_identity
    if mode not in MODES:
        raise ValueError(f"SENDER_IDENTITY must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return NoCheck()
    if not config.oidc_audience:
        raise ValueError(
            f"SENDER_IDENTITY={mode} needs OIDC_AUDIENCE (or K_SERVICE): the receiver's audience"
        )
    if not config.oidc_allowed_subjects:
        raise ValueError(f"SENDER_IDENTITY={mode} needs OIDC_ALLOWED_SUBJECTS: who may deliver")
    subjects = frozenset(config.oidc_allowed_subjects)
    policy = Policy(mode, config.oidc_issuer, config.oidc_audience, subjects, receiver=config.function_name)
    source = IssuerKeys(config.oidc_issuer, ca_file=config.oidc_ca_file, token_file=config.oidc_token_file)
    return SenderIdentity(policy, KeyCache(source))
