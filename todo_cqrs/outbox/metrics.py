"""What every outbox publisher counts: the command processes' and the relay's."""

from prometheus_client import Counter

outbox_published = Counter("todo_outbox_published", "Outbox rows this process put on Kafka")
outbox_publish_failures = Counter(
    "todo_outbox_publish_failures", "Publishes that left rows pending (Kafka or the DB failed, a lease lost)"
)
