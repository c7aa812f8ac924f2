"""Schema registry: the client side (schema ids of the packaged schemas) and the dev
registry server speaking Confluent's REST API."""
