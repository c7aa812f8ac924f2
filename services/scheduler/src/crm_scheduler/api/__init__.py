"""gRPC API of the scheduler: validation (proto -> domain), conversion, servicer."""
