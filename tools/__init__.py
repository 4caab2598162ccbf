"""Local tooling: services, runner, gateway, local KafkaSource, bench. Never deployed to a cluster."""
