"""The transactional outbox's way to Kafka.

A command commits its change and its event (an `outbox` row) in one transaction. Then:
- `publisher`: the committing process publishes its own rows at once, in commit order, and marks them
  published; a row whose todo still has an older row pending in another process waits for it.
- `relay`: rows no process published within OUTBOX_ORPHAN_SECONDS (their process crashed, froze, or
  Kafka was down) are orphans; the relay's tick publishes them, one shard at a time under its lease.
- `leases`: who may drain an outbox shard, until when (one autocommitted statement each).
"""
