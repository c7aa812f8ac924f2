"""gRPC api of the assignment service: thin servicer, validation, conversion, offer streams."""
