"""gRPC api: request checks and proto <-> domain conversion over the intake."""
