"""The local gateway: the original sample's routes on one port, forwarded to the function processes.

Local tooling only; in a cluster each function is its own Knative Service behind Knative's ingress.
Served by gunicorn: `gunicorn local.gateway:app`. The route table is `local.topology.ROUTES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import urllib3

from local.topology import BY_NAME, ROUTES

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
MAX_BODY_BYTES = 1024 * 1024  # the functions enforce the contract's 64 KiB; this only bounds memory
UPSTREAM_TIMEOUT = urllib3.Timeout(connect=2.0, read=30.0)

_pool = urllib3.PoolManager(maxsize=32, block=False, retries=False, timeout=UPSTREAM_TIMEOUT)
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _matches(pattern: str, path: str) -> bool:
    want = [p for p in pattern.split("/") if p]
    have = [p for p in path.split("/") if p]
    return len(want) == len(have) and all(w == "{id}" or w == h for w, h in zip(want, have, strict=True))


def resolve(method: str, path: str) -> tuple[str | None, list[str]]:
    """(function name, []) for a route; (None, allowed methods) when only the method is wrong;
    (None, []) for an unknown path."""
    allowed: list[str] = []
    for route_method, pattern, function in ROUTES:
        if _matches(pattern, path):
            if method == route_method or (method == "HEAD" and route_method == "GET"):
                return function, []
            allowed.append(route_method)
    if "GET" in allowed:
        allowed.append("HEAD")
    return None, allowed


def _json(
    start_response: StartResponse,
    status: str,
    code: str,
    message: str,
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    body = json.dumps({"error": {"code": code, "message": message, "details": []}}).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]
    )
    return [body]


def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"status":"ok"}']
    function, allowed = resolve(method, path)
    if function is None:
        if allowed:
            return _json(
                start_response,
                "405 Method Not Allowed",
                "method_not_allowed",
                f"method not allowed; use {', '.join(allowed)}",
                [("Allow", ", ".join(allowed))],
            )
        return _json(start_response, "404 Not Found", "not_found", f"no route for {path}")

    length = int(environ.get("CONTENT_LENGTH") or 0)
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    body = environ["wsgi.input"].read(MAX_BODY_BYTES + 1) if chunked or length else None
    if length > MAX_BODY_BYTES or (body is not None and len(body) > MAX_BODY_BYTES):
        return _json(start_response, "413 Payload Too Large", "payload_too_large", "the body is too large")
    headers = {
        key[5:].replace("_", "-").title(): value
        for key, value in environ.items()
        if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in HOP_BY_HOP
    }
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    query = environ.get("QUERY_STRING")
    url = BY_NAME[function].url + path + (f"?{query}" if query else "")
    try:
        upstream = _pool.request(
            method, url, body=body, headers=headers, redirect=False, preload_content=True
        )
    except urllib3.exceptions.HTTPError as exc:
        return _json(
            start_response,
            "503 Service Unavailable",
            "dependency_unavailable",
            f"the {function} function is unreachable: {type(exc).__name__}",
            [("Retry-After", "1")],
        )
    out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
    out.append(("Content-Length", str(len(upstream.data))))
    start_response(f"{upstream.status} {upstream.reason or ''}".strip(), out)
    return [upstream.data]
