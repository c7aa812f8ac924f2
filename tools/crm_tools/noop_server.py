"""A bare grpc.aio server with one no-op unary RPC: the benchmarks' baseline.

`python -m crm_tools.noop_server serve` reads CRM_NOOP_PORT; it answers the standard
health service (so `wait_serving` works) and `/crm.bench.Noop/Ping`, which echoes the
request bytes. No interceptors, no database: the cost of one gRPC round trip in Python.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # == health.aio.HealthServicer (no stubs)

NOOP_METHOD = "/crm.bench.Noop/Ping"


def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "crm.bench.Noop", {"Ping": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    hs = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> int:
    if sys.argv[1:] != ["serve"]:
        print("usage: python -m crm_tools.noop_server serve", file=sys.stderr)
        return 2
    asyncio.run(serve(int(os.environ["CRM_NOOP_PORT"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
