"""The whole local system, started by `make run`'s own start-up code, for end-to-end tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from requests.structures import CaseInsensitiveDict

from tools import run
from tools.topology import GATEWAY_PORT, HOST


@dataclass
class Answer:
    status: int
    headers: CaseInsensitiveDict[str]  # HTTP header names are case-insensitive (uvicorn sends them lowercase)
    body: Any


class Client:
    """A tiny HTTP client for the gateway: JSON in, JSON out, no retries."""

    def __init__(self, base: str) -> None:
        self.base = base

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json"} if data is not None else {}
        all_headers.update(headers or {})
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, reply_headers, payload = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            status, reply_headers, payload = error.code, dict(error.headers), error.read()
        return Answer(status, CaseInsensitiveDict(reply_headers), json.loads(payload) if payload else None)


@pytest.fixture(scope="module")
def system(services: None) -> Iterator[run.System]:
    """Every function, the gateway and the local KafkaSource, as `make run` starts them; per module, so
    that its relay is gone when the integration tests simulate a Kafka outage in-process."""
    system = run.System()
    try:
        run.start(system)
        yield system
    finally:
        system.stop()


@pytest.fixture(scope="module")
def gateway(system: run.System) -> Client:
    return Client(f"http://{HOST}:{GATEWAY_PORT}")
