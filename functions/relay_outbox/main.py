"""relay_outbox: publishes orphaned outbox events (still pending OUTBOX_ORPHAN_SECONDS after their commit); a
PingSource POSTs to it (locally the runner does). It also deletes expired Idempotency-Keys.

Only that PingSource may call it (SENDER_IDENTITY, todo_cqrs/sender_identity.py)."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap, metrics
from todo_cqrs.http import HttpFunction, json_response
from todo_cqrs.outbox.relay import RelayTick
from todo_cqrs.settings import settings


def build(tick: RelayTick) -> HttpFunction:
    async def relay(request: Request, todo_id: None) -> Response:
        published = await tick.relay.drain_all()  # orphans; a shard leased elsewhere is skipped
        purged = await tick.store.purge_expired_keys()
        return json_response(200, {"published": published, "expired_keys_deleted": purged})

    metrics.on_scrape(tick.gauges)  # the outbox gauges, refreshed at most every 5 s
    return HttpFunction(collection={"POST": relay}, identity=tick.identity)


deps = bootstrap.relay(settings())
function = build(deps)


@functions_framework.aio.http
async def relay_outbox(request: Request) -> Response:
    return await function(request)
