"""The live page's pipeline health, served to the gateway's `/ui/api/` (local tooling only).

An ASGI app around `tools.pipeline.answer`, run by uvicorn (the functions' QuietServer):
`python -m tools.pipeline_server` (PIPELINE_PORT). Only GET; the answer's body is JSON.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from todo_cqrs.http import error_body
from todo_cqrs.serve import QuietServer
from tools import pipeline
from tools.topology import HOST, PIPELINE_PORT

_NOT_ALLOWED = orjson.dumps(error_body("method_not_allowed", "method not allowed; use GET"))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] not in ("GET", "HEAD"):
        status, body, extra = 405, _NOT_ALLOWED, [(b"allow", b"GET, HEAD")]
    else:
        status, body = await pipeline.answer(scope["path"])
        extra = []
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    # The functions' QuietServer: uvicorn's, waking once a second instead of ten times when idle.
    config = uvicorn.Config(
        app, host=HOST, port=PIPELINE_PORT, lifespan="off", access_log=False, log_level="warning"
    )
    server = QuietServer(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run: the server could not start (the port taken, say)
