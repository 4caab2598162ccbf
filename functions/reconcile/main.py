"""reconcile: compares the read model with the write model and repairs it (docs/reconciliation.md);
a PingSource POSTs to it (locally the runner does). POST / runs one pass and answers what it found.

Only that PingSource may call it (SENDER_IDENTITY, todo_cqrs/sender_identity.py)."""

from collections.abc import Callable

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap
from todo_cqrs.http import HttpFunction, SenderCheck, json_response
from todo_cqrs.reconcile.service import ReconcileTick
from todo_cqrs.settings import settings


def build(tick: ReconcileTick, identity: Callable[[], SenderCheck] | None = None) -> HttpFunction:
    """POST / runs a pass of `tick`; `identity` makes the sender check (None: anyone may call)."""

    async def run_pass(request: Request, todo_id: None) -> Response:
        return json_response(200, await tick.run())

    return HttpFunction(collection={"POST": run_pass}, identity=identity)


deps = bootstrap.reconcile(settings())
function = build(deps, bootstrap.sender_check(settings()))


@functions_framework.aio.http
async def reconcile(request: Request) -> Response:
    return await function(request)
