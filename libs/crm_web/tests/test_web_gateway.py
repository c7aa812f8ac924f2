"""The grpc-web gateway against the real assignment service (MariaDB, etcd, gRPC on real
sockets), spoken to as a browser would: grpc-web over HTTP/1.1 (httpx)."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from pathlib import Path

import httpx
import pytest
import uvicorn
from crm.assignment.v1 import assignment_pb2 as pb
from crm.common.v1 import common_pb2
from crm_assignment.app import build_app
from crm_assignment.settings import AssignmentSettings
from crm_assignment.store.migrate import upgrade
from crm_web.gateway import Forwarder, forwarded_metadata, grpc_web_app
from crm_web.static import StaticFiles
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

SVC = "crm.assignment.v1.AssignmentService"
GRPC_WEB = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "accept": "*/*"}


def frame(msg: Message, trailer: bool = False) -> bytes:
    data = msg.SerializeToString()
    return struct.pack(">BI", 0x80 if trailer else 0, len(data)) + data


def unframe(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """grpc-web body -> (messages, trailers)."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        data, body = body[5 : 5 + length], body[5 + length :]
        if flags & 0x80:
            for line in data.decode().splitlines():
                k, _, v = line.partition(":")
                trailers[k.strip()] = v.strip()
        else:
            messages.append(data)
    return messages, trailers


@pytest.fixture
async def assignment(mysql_database: str, etcd_endpoint: str, config_prefix: str):  # type: ignore[no-untyped-def]
    upgrade(mysql_database)
    settings = AssignmentSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        database_url=mysql_database,
        db_pool_size=4,
        etcd_endpoints=etcd_endpoint,
        config_prefix=config_prefix,
        dispatch_poll_s=0.2,
        shutdown_grace_s=1.0,
        readiness_interval_s=0.2,
    )
    app = build_app(settings)
    await app.start()
    await app.wait_ready()
    yield app
    await app.stop(0.5)


@pytest.fixture
async def gateway_app(assignment, tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "index.html").write_text("<!doctype html><title>console</title>")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app-1234.js").write_text("console.log(1)")
    app, forwarder = grpc_web_app({SVC: assignment.target}, StaticFiles(tmp_path))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", forwarder
    server.should_exit = True
    await task
    await forwarder.close()


@pytest.fixture
def gateway(gateway_app: tuple[str, Forwarder]) -> str:
    return gateway_app[0]


async def test_unary_call_round_trips_and_keeps_request_id(gateway: str) -> None:
    agent = pb.Agent(id=7, name="Li Na", business_line=common_pb2.BUSINESS_LINE_SALE, capacity=1)
    async with httpx.AsyncClient(base_url=gateway) as http:
        r = await http.post(
            f"/{SVC}/UpsertAgent",
            content=frame(pb.UpsertAgentRequest(agent=agent)),
            headers={**GRPC_WEB, "x-request-id": "req-web-1", "cookie": "secret=1"},
        )
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/grpc-web+proto"
        messages, trailers = unframe(r.content)
        assert trailers["grpc-status"] == "0"
        assert trailers["x-request-id"] == "req-web-1"
        resp = pb.UpsertAgentResponse.FromString(messages[0])
        assert resp.created
        assert resp.agent.name == "Li Na"
        # and the service really stored it
        r = await http.post(
            f"/{SVC}/GetAgent", content=frame(pb.GetAgentRequest(id=7)), headers=GRPC_WEB
        )
        messages, trailers = unframe(r.content)
        assert pb.GetAgentResponse.FromString(messages[0]).agent.capacity == 1


async def test_errors_carry_status_message_and_field_details(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        r = await http.post(
            f"/{SVC}/GetTask", content=frame(pb.GetTaskRequest(id=0)), headers=GRPC_WEB
        )
        assert r.status_code == 200
        assert r.headers["grpc-status"] == "3"  # INVALID_ARGUMENT, trailers-only
        raw = r.headers["grpc-status-details-bin"]
        st = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
        bad = error_details_pb2.BadRequest()
        assert st.details[0].Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["id"]
        r = await http.post(
            f"/{SVC}/GetTask", content=frame(pb.GetTaskRequest(id=424242)), headers=GRPC_WEB
        )
        assert r.headers["grpc-status"] == "5"  # NOT_FOUND
        assert "424242" in httpx.URL("/?m=" + r.headers["grpc-message"]).params["m"]


async def test_offer_stream_opens_at_once_and_pushes_offers(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        agent = pb.Agent(
            id=9, name="Wang Wei", business_line=common_pb2.BUSINESS_LINE_SALE, capacity=1
        )
        await http.post(
            f"/{SVC}/UpsertAgent",
            content=frame(pb.UpsertAgentRequest(agent=agent)),
            headers=GRPC_WEB,
        )
        await http.post(
            f"/{SVC}/SetPresence",
            content=frame(pb.SetPresenceRequest(agent_id=9, presence=pb.PRESENCE_IDLE)),
            headers=GRPC_WEB,
        )
        req = frame(pb.StreamOffersRequest(agent_id=9))
        async with http.stream("POST", f"/{SVC}/StreamOffers", content=req, headers=GRPC_WEB) as r:
            # headers arrive before any offer exists
            assert r.status_code == 200
            assert "grpc-status" not in r.headers
            clue = pb.CreateClueRequest(
                idempotency_key="web-1",
                phone="13812341234",
                business_line=common_pb2.BUSINESS_LINE_SALE,
                source="app",
                city="beijing",
            )
            created = await http.post(f"/{SVC}/CreateClue", content=frame(clue), headers=GRPC_WEB)
            task_id = pb.CreateClueResponse.FromString(unframe(created.content)[0][0]).task.id
            buf = b""
            async for chunk in r.aiter_bytes():
                buf += chunk
                if len(buf) >= 5 and len(buf) >= 5 + struct.unpack(">BI", buf[:5])[1]:
                    break
            offer = pb.StreamOffersResponse.FromString(unframe(buf)[0][0]).offer
            assert offer.task.id == task_id
            assert offer.customer.phone.masked == "138****1234"


async def test_unknown_methods_and_static_files(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        r = await http.post(f"/{SVC}/NoSuchMethod", content=b"", headers=GRPC_WEB)
        assert r.status_code == 405  # not routed: falls through to the static files
        r = await http.post("/crm.config.v1.Nothing/Get", content=b"", headers=GRPC_WEB)
        assert r.status_code == 405
        assert (await http.get("/")).text.startswith("<!doctype html>")
        assert "console" in (await http.get("/tasks/12")).text  # client-side route
        js = await http.get("/assets/app-1234.js")
        assert js.headers["content-type"] == "text/javascript"
        assert "immutable" in js.headers["cache-control"]
        assert (await http.get("/assets/missing.js")).status_code == 404
        assert (await http.get("/healthz")).text == "ok\n"
    # a path escaping the folder, sent raw (an HTTP client would normalize it)
    host, port = httpx.URL(gateway).host, httpx.URL(gateway).port
    for path in ("/../../../../etc/hostname", "/assets/../../../../../etc/hostname.txt"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404"), answer[:80]


def test_only_allow_listed_headers_are_forwarded() -> None:
    got = forwarded_metadata(
        [
            ("authorization", "Bearer t"),
            ("X-Request-Id", "r1"),
            ("cookie", "c"),
            ("host", "h"),
            ("user-agent", "u"),
            ("traceparent", "00-abc-def-01"),
            ("x-crm-author", "ops"),
            ("x-crm-other", "no"),
        ]
    )
    assert got == [
        ("authorization", "Bearer t"),
        ("x-request-id", "r1"),
        ("traceparent", "00-abc-def-01"),
        ("x-crm-author", "ops"),
    ]


def test_unknown_service_is_refused() -> None:
    with pytest.raises(KeyError):
        Forwarder({"crm.nothing.v1.Nothing": "127.0.0.1:1"})


async def test_closing_the_browser_ends_the_upstream_stream(
    gateway_app: tuple[str, Forwarder],
) -> None:
    url, forwarder = gateway_app
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        agent = pb.Agent(id=11, name="Zhao Lei", business_line=common_pb2.BUSINESS_LINE_SALE)
        agent.capacity = 1
        await http.post(
            f"/{SVC}/UpsertAgent",
            content=frame(pb.UpsertAgentRequest(agent=agent)),
            headers=GRPC_WEB,
        )
        req = frame(pb.StreamOffersRequest(agent_id=11))
        async with http.stream("POST", f"/{SVC}/StreamOffers", content=req, headers=GRPC_WEB) as r:
            assert r.status_code == 200
            assert forwarder.open_streams == 1
        # the response was closed without reading: the connection goes, and so does the
        # upstream call, without waiting for a message that would reveal the dead peer
    deadline = asyncio.get_running_loop().time() + 10
    while forwarder.open_streams and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert forwarder.open_streams == 0


async def test_serve_command_prints_its_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import sys

    (tmp_path / "index.html").write_text("<!doctype html><title>console</title>")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "crm_web",
        "serve",
        "--port",
        "0",
        "--assignment",
        "127.0.0.1:1",
        "--static",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("crm-web: console at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].strip()
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert "console" in (await http.get("/")).text
            # the service is down: the call answers UNAVAILABLE, the gateway stays up
            r = await http.post(
                f"/{SVC}/GetTask", content=frame(pb.GetTaskRequest(id=1)), headers=GRPC_WEB
            )
            assert r.headers["grpc-status"] == "14"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_refuses_an_unknown_service() -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "crm_web", "serve", "--route", "crm.nope.v1.Nope=127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0
    assert "unknown service" in res.stderr
