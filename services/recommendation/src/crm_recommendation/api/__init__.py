"""gRPC api of the recommendation service: validation, conversion, the servicer."""
