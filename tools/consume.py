"""`make consume`: print every event on the topic as one JSON line (key, partition, headers, data)."""

import json
import sys
import uuid

from confluent_kafka import Consumer

from todo_cqrs.settings import settings

if __name__ == "__main__":
    s = settings()
    consumer = Consumer(
        {
            "bootstrap.servers": s.kafka_bootstrap_servers,
            "group.id": f"consume-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([s.topic])
    print(f"reading {s.topic} from the beginning (Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            headers = {k: v.decode(errors="replace") for k, v in message.headers() or []}
            print(
                json.dumps(
                    {
                        "partition": message.partition(),
                        "offset": message.offset(),
                        "key": (message.key() or b"").decode(),
                        "headers": headers,
                        "data": json.loads(message.value() or b"null"),
                    }
                ),
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
