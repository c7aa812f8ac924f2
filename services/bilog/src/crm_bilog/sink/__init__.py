"""The built-in sink: Kafka -> time-partitioned Avro container files, exactly once."""
