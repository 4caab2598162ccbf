"""What each function needs, built from one `Settings` value, and nothing else: its dependencies are made
here and passed in; no handler looks one up.

Each `functions/<name>/main.py` calls one of these at import. Nothing connects then: an engine, a Redis
client or a Kafka producer is made on first use, in the event loop that serves the requests, and
`aclose()` closes them (the command-line tools and the tests; a function's process simply ends).
"""

from __future__ import annotations


# --- commands: create_todo, update_todo, delete_todo, relay_outbox --------------------------------------


# --- queries and events: get_todos, project_event, dead_letter, reconcile -------------------------------
