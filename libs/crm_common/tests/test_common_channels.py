"""The shared client channel retries UNAVAILABLE itself (gRPC service-config retries),
against a real server on a real socket; other codes and ``retry=None`` are not retried."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from crm_common.channels import DEFAULT_RETRY, RetryPolicy, service_config
from crm_common.interceptors import insecure_channel
from grpc import aio

METHOD = "/test.Flaky/Call"


class Flaky:
    """Fails the first ``fail`` calls with ``code``, then answers the request back."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = 0
        self.code = grpc.StatusCode.UNAVAILABLE

    async def call(self, request: bytes, context: aio.ServicerContext) -> bytes:
        self.calls += 1
        if self.calls <= self.fail:
            await context.abort(self.code, f"attempt {self.calls} fails")
        return request


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[Flaky, str]]:
    servicer = Flaky()
    server = aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Flaky", {"Call": grpc.unary_unary_rpc_method_handler(servicer.call)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _call(target: str, retry: RetryPolicy | None = DEFAULT_RETRY) -> bytes:
    async with insecure_channel(target, retry=retry) as ch:
        call = ch.unary_unary(METHOD)
        return bytes(await call(b"ping", timeout=10))


async def test_unavailable_is_retried_until_it_succeeds(flaky: tuple[Flaky, str]) -> None:
    servicer, target = flaky
    servicer.fail = 2
    assert await _call(target) == b"ping"
    assert servicer.calls == 3


async def test_retries_stop_at_max_attempts(flaky: tuple[Flaky, str]) -> None:
    servicer, target = flaky
    servicer.fail = 10
    with pytest.raises(aio.AioRpcError) as err:
        await _call(target, RetryPolicy(max_attempts=3))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 3


async def test_other_codes_are_not_retried(flaky: tuple[Flaky, str]) -> None:
    servicer, target = flaky
    servicer.fail, servicer.code = 1, grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(aio.AioRpcError) as err:
        await _call(target)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert servicer.calls == 1


async def test_retry_none_switches_retries_off(flaky: tuple[Flaky, str]) -> None:
    servicer, target = flaky
    servicer.fail = 1
    with pytest.raises(aio.AioRpcError):
        await _call(target, None)
    assert servicer.calls == 1


def test_service_config_is_the_documented_json() -> None:
    cfg = json.loads(service_config(RetryPolicy(max_attempts=5, initial_backoff_s=0.1)))
    policy = cfg["methodConfig"][0]["retryPolicy"]
    assert cfg["methodConfig"][0]["name"] == [{}]
    assert policy["maxAttempts"] == 5
    assert policy["initialBackoff"] == "0.100s"
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in json.loads(service_config(None))["methodConfig"][0]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 1}, {"max_attempts": 6}, {"initial_backoff_s": 2.0}, {"codes": ()}],
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
