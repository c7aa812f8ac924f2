"""``python -m crm_web serve``: the dev gateway of the agent console and config review.

    python -m crm_web serve --assignment 127.0.0.1:50051 --config-admin 127.0.0.1:50055 \\
        [--recommendation HOST:PORT] [--route SERVICE=HOST:PORT ...] \\
        [--author-header X-Auth-Request-User] [--host 127.0.0.1] [--port 8080] \
        [--static web/dist]

Serves the built console (``make web`` builds ``web/dist``) and forwards the console's
grpc-web calls to the services' real gRPC endpoints. Prints one line
``crm-web: console at http://HOST:PORT/`` once it listens (``--port 0`` picks a free
port). Stops on SIGTERM/SIGINT (open offer streams are closed after a short grace).

Only the console's RPCs are forwarded (``crm_web.gateway.POLICIES``). ``--author-header``
(or ``CRM_WEB_AUTHOR_HEADER``): the header an authenticating proxy in front of the gateway
sets to the signed-in user; ConfigAdmin's author of a change is taken from it (the
browser's ``x-crm-author`` is dropped) and a ConfigAdmin call without it is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn
from crm_common.logs import configure_logging

from crm_web.gateway import ASSIGNMENT, CONFIG_ADMIN, RECOMMENDATION, describe, grpc_web_app
from crm_web.static import StaticFiles

log = logging.getLogger("crm.web")

DEFAULT_STATIC = Path(__file__).resolve().parents[4] / "web" / "dist"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-web", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the console and forward its grpc-web calls")
    serve.add_argument("--assignment", metavar="HOST:PORT", help="assignment service target")
    serve.add_argument("--config-admin", metavar="HOST:PORT", help="ConfigAdmin service target")
    serve.add_argument("--recommendation", metavar="HOST:PORT", help="recommendation target")
    serve.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="SERVICE=HOST:PORT",
        help="forward another fully qualified service (repeatable)",
    )
    serve.add_argument(
        "--author-header",
        default=os.environ.get("CRM_WEB_AUTHOR_HEADER") or None,
        metavar="HEADER",
        help="trusted header naming the config author, set by the authenticating proxy"
        " (env CRM_WEB_AUTHOR_HEADER); the browser's x-crm-author is then dropped",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="HTTP port; 0 picks a free one")
    serve.add_argument(
        "--static", type=Path, default=DEFAULT_STATIC, help="built console (web/dist)"
    )
    serve.add_argument("--log-level", default="INFO")
    return parser


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT ends it with exit code 0 after the
    graceful stop (as every service of the platform), where uvicorn re-raises the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _stop(self) -> None:
        if self.should_exit:  # a second signal: do not wait for open streams
            self.force_exit = True
        self.should_exit = True


def routes_from(args: argparse.Namespace) -> dict[str, str]:
    routes: dict[str, str] = {}
    for service, target in (
        (ASSIGNMENT, args.assignment),
        (CONFIG_ADMIN, args.config_admin),
        (RECOMMENDATION, args.recommendation),
    ):
        if target:
            routes[service] = target
    for spec in args.route:
        service, sep, target = spec.partition("=")
        if not sep or not service or not target:
            raise SystemExit(f"--route {spec!r}: expected SERVICE=HOST:PORT")
        routes[service] = target
    if not routes:
        raise SystemExit("nothing to forward: give --assignment and/or --config-admin")
    return routes


async def serve(args: argparse.Namespace) -> None:
    routes = routes_from(args)
    if not (args.static / "index.html").is_file():
        log.warning("no built console at %s (run `make web`); only grpc-web is served", args.static)
    try:
        app, forwarder = grpc_web_app(routes, StaticFiles(args.static), args.author_header)
    except KeyError as exc:
        raise SystemExit(f"unknown service {exc} (not in proto/)") from exc
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)  # connections wait in the backlog until uvicorn accepts them
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    server = GracefulServer(config)
    for line in describe(routes):
        log.info("forwarding %s", line)
    if CONFIG_ADMIN in routes and not args.author_header:
        log.warning(
            "config review is unauthenticated and its author is what the browser says:"
            " in production put it behind an authenticating proxy (--author-header)"
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"crm-web: console at http://{host}:{port}/", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        await forwarder.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging("web", args.log_level)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
