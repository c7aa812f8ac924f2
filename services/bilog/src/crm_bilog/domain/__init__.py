"""Pure logic of the BI log: JSON -> Avro conversion with field paths, PII protection,
schema compatibility and the Confluent wire format. No I/O here."""
