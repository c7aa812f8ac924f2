"""Getting events into Kafka: the async producer and the intake pipeline."""
