"""Operator benchmark (CRMConfig propagation), called by `make bench` through ``run(seconds)``.

Three latencies are sampled in rounds (one CR change and 5 put/raw pairs, the order
alternating from round to round and pair to pair, so that noise hits them alike):

- CR change -> applied: a merge patch of a CRMConfig's ``spec.data`` through the Kubernetes
  API stand-in (kmock's KubernetesEmulator, as the operator tests use it) until a live
  :class:`ConfigWatcher` (assignment's ``parse``) ran ``on_apply`` with the new value. The
  real operator (every handler) runs in kopf's KopfRunner thread; target p99 < 1 s (Apollo's
  published push latency is about 1 s).
- etcd put -> applied: a direct put of a key no CRMConfig declares (the drift guard only
  repairs declared keys) until the same watcher applied it.
- raw etcd watch (baseline): a put of a key outside the config prefix until a bare aetcd
  watch delivers the event. The put -> applied p99 must stay within 3x of this p99.

Both puts go through one long-lived aetcd client, so neither pays a connection set-up. The
value of each sample is a counter in ``merge_window_s``. After a CR change the bench waits
for the operator's status (observedGeneration) and a short idle gap, so every change meets
an idle operator. At least 30 samples of each are taken. Every key lives under a fresh
``/crm-bench/<run>/`` prefix on the local stack's etcd, deleted afterwards. Standalone:
``PYTHONPATH=tools python -m crm_tools.bench_operator [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import aetcd
import aiohttp
import kmock
import kopf
from crm_assignment.config import CONFIG_SUBPREFIX, LineConfig, parse
from crm_common.config_watch import ConfigSnapshot, ConfigWatcher, config_key
from crm_devstack import free_port, up
from kopf.testing import KopfRunner

from crm_tools.bench import ROOT, Measure, pct, print_table

__all__ = ["run"]

TESTS = ROOT / "operator" / "tests"
ENTRY = str(TESTS / "kopf_entry.py")  # every handler + a login pointing at the stand-in
GROUP_VERSION = "crm.platform.io/v1alpha1"
NS, NAME = "crm-bench", "bench-sale"
CR_KEY, PUT_KEY = "SALE", "FINANCE"  # FINANCE: declared by no CRMConfig, never repaired
MIN_SAMPLES = 30
WARMUP = 2  # rounds not counted
PUTS_PER_ROUND = 5  # put/raw pairs per CR change: the ratio of two p99s needs samples
TIMEOUT = 10.0  # one sample at most; a timed-out sample counts as this latency
IDLE_GAP = 0.25  # after the operator settled, so a CR change meets an idle operator
BASE_VALUE = {"accept_timeout_s": 600}

Waiters = dict[Hashable, asyncio.Future[float]]


def _standin() -> Any:
    """The operator tests' KubernetesStandIn (kmock's emulator plus resourceVersion and
    generation bookkeeping), with every resource the operator watches declared."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    server = importlib.import_module("k8s_standin").KubernetesStandIn()
    server.declare("v1/namespaces", kind="Namespace", namespaced=False)
    server.declare("v1/events", kind="Event", namespaced=True)
    server.declare(
        "apiextensions.k8s.io/v1/customresourcedefinitions",
        kind="CustomResourceDefinition",
        namespaced=False,
    )
    server.declare("apps/v1/deployments", kind="Deployment", namespaced=True, status=True)
    server.declare(f"{GROUP_VERSION}/crmconfigs", kind="CRMConfig", namespaced=True, status=True)
    server.declare(f"{GROUP_VERSION}/bilogsinks", kind="BILogSink", namespaced=True, status=True)
    return server


async def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench_operator: timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _operator(server: Any, kube_url: str, etcd: str, prefix: str) -> AsyncIterator[None]:
    """The real operator in kopf's KopfRunner thread (as operator/tests/conftest.py runs it),
    with production intervals; its settings come from the environment, restored afterwards."""
    env = {
        "CRM_TEST_KUBE_URL": kube_url,
        "CRM_OPERATOR_KUBE_API_SERVER": kube_url,
        "CRM_OPERATOR_ETCD_ENDPOINTS": etcd,
        "CRM_OPERATOR_CONFIG_PREFIX": prefix,
        "CRM_OPERATOR_WEBHOOK_PORT": str(free_port()),
        "CRM_OPERATOR_METRICS_PORT": "-1",
    }
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    root = logging.getLogger()
    saved_log = (root.level, list(root.handlers))  # kopf's CLI reconfigures the root logger
    runner = KopfRunner(["run", "-A", "--standalone", ENTRY], registry=kopf.OperatorRegistry())
    await asyncio.to_thread(runner.__enter__)
    try:

        def watching() -> bool:
            plurals = {
                r.resource.plural
                for r in list(server)
                if r.resource is not None and r.action == kmock.action.WATCH
            }
            return plurals >= {"crmconfigs", "bilogsinks"}

        await _until(watching, "kopf watching its resources")
        yield
    finally:
        try:
            await asyncio.to_thread(runner.__exit__, None, None, None)
        finally:
            root.setLevel(saved_log[0])
            root.handlers[:] = saved_log[1]
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if runner.exception is not None:
        raise RuntimeError(f"the operator failed: {runner.output[-3000:]}")


async def _sample(waiters: Waiters, key: Hashable, trigger: Callable[[], Awaitable[Any]]) -> float:
    """Seconds from just before ``trigger()`` until ``waiters[key]`` is resolved (with the
    perf_counter time of arrival), or TIMEOUT."""
    fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    waiters[key] = fut
    t0 = time.perf_counter()
    await trigger()
    try:
        return await asyncio.wait_for(fut, TIMEOUT) - t0
    except TimeoutError:
        waiters.pop(key, None)
        return TIMEOUT


def _row(m: Measure, ratio: float, target: float | None, timeouts: int) -> dict[str, Any]:
    return {
        "measure": m.name,
        "rate": m.rate,
        "unit": "changes/s",
        "ratio": ratio,
        "target": target,
        "target_op": "<=",
        "ops": m.ops,
        "seconds": m.seconds,
        "p50_ms": m.p50_ms,
        "p99_ms": m.p99_ms,
        "timeouts": timeouts,
    }


async def run(seconds: float = 10.0) -> list[dict[str, Any]]:
    stack = await asyncio.to_thread(up, False)
    etcd = stack.etcd_endpoint
    host, port = etcd.rsplit(":", 1)
    base = f"/crm-bench/{uuid.uuid4().hex[:12]}"
    prefix = f"{base}/config"
    put_key = config_key(prefix, "assignment", PUT_KEY).encode()
    raw_key = f"{base}/raw".encode()
    cr_path = f"apis/{GROUP_VERSION}/namespaces/{NS}/crmconfigs"

    applied: Waiters = {}  # (key, counter) -> arrival, resolved by the watcher's on_apply
    raw: Waiters = {}  # counter -> arrival, resolved by the raw watch

    def on_apply(snapshot: ConfigSnapshot[LineConfig]) -> None:
        now = time.perf_counter()
        for key in (CR_KEY, PUT_KEY):
            value = snapshot.values.get(key)
            if value is not None:
                fut = applied.pop((key, value.merge_window_s), None)
                if fut is not None and not fut.done():
                    fut.set_result(now)

    watcher: ConfigWatcher[LineConfig] = ConfigWatcher(
        etcd,
        f"{prefix}/{CONFIG_SUBPREFIX}",
        parse,
        on_apply=on_apply,
        name="bench-assignment",
        ack=f"bench-{uuid.uuid4().hex[:8]}",
    )
    server = _standin()
    lat: dict[str, list[float]] = {"cr": [], "put": [], "raw": []}
    timeouts = dict.fromkeys(lat, 0)
    elapsed = 0.0
    async with contextlib.AsyncExitStack() as es:
        client = await es.enter_async_context(aetcd.Client(host=host, port=int(port), timeout=5))
        es.push_async_callback(client.delete_prefix, f"{base}/".encode())  # runs last
        await es.enter_async_context(server)
        srv = await es.enter_async_context(kmock.Server(server))
        session = await es.enter_async_context(aiohttp.ClientSession())
        kube = str(srv.url).rstrip("/")
        await watcher.start(timeout=10)
        es.push_async_callback(watcher.stop)

        watch_client = await es.enter_async_context(
            aetcd.Client(host=host, port=int(port), timeout=5)
        )
        watch = await watch_client.watch(raw_key)

        async def pump() -> None:
            async for event in watch:
                now = time.perf_counter()
                fut = raw.pop(int(json.loads(event.kv.value)["merge_window_s"]), None)
                if fut is not None and not fut.done():
                    fut.set_result(now)

        pump_task = asyncio.create_task(pump(), name="bench-raw-watch")

        async def stop_pump() -> None:
            pump_task.cancel()
            await asyncio.wait({pump_task})

        es.push_async_callback(stop_pump)

        await es.enter_async_context(_operator(server, kube, etcd, prefix))

        def settled() -> bool:
            obj = server.object(f"{GROUP_VERSION}/crmconfigs", NS, NAME)
            st = (obj or {}).get("status") or {}
            return bool(obj) and st.get("observedGeneration") == obj["metadata"]["generation"]

        async def kube_call(method: str, path: str, body: Any = None) -> None:
            headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
            async with session.request(method, f"{kube}/{path}", json=body, headers=headers) as r:
                if r.status >= 300:
                    raise RuntimeError(f"{method} {path}: {r.status} {await r.text()}")

        async def delete_cr() -> None:
            with contextlib.suppress(Exception):
                await kube_call("DELETE", f"{cr_path}/{NAME}")
                await _until(
                    lambda: server.object(f"{GROUP_VERSION}/crmconfigs", NS, NAME) is None,
                    "the CRMConfig deleted (finalizer released)",
                    10.0,
                )

        es.push_async_callback(delete_cr)  # before the operator stops (LIFO)

        counter = 0
        spec = {"service": "assignment", "key": CR_KEY, "data": {**BASE_VALUE, "merge_window_s": 0}}
        first = await _sample(
            applied,
            (CR_KEY, 0),
            lambda: kube_call(
                "POST",
                cr_path,
                {
                    "apiVersion": GROUP_VERSION,
                    "kind": "CRMConfig",
                    "metadata": {"name": NAME, "namespace": NS},
                    "spec": spec,
                },
            ),
        )
        if first >= TIMEOUT:
            raise TimeoutError("bench_operator: the CRMConfig never reached the watcher")
        await _until(settled, "the operator's status of the CRMConfig")

        async def cr_change() -> float:
            nonlocal counter
            counter += 1
            n = counter
            patch = {"spec": {"data": {"merge_window_s": n}}}
            took = await _sample(
                applied, (CR_KEY, n), lambda: kube_call("PATCH", f"{cr_path}/{NAME}", patch)
            )
            await _until(settled, "the operator's status of the CRMConfig")
            await asyncio.sleep(IDLE_GAP)
            return took

        async def etcd_put() -> float:
            nonlocal counter
            counter += 1
            n = counter
            value = json.dumps({**BASE_VALUE, "merge_window_s": n}).encode()
            return await _sample(applied, (PUT_KEY, n), lambda: client.put(put_key, value))

        async def raw_put() -> float:
            nonlocal counter
            counter += 1
            n = counter
            value = json.dumps({**BASE_VALUE, "merge_window_s": n}).encode()
            return await _sample(raw, n, lambda: client.put(raw_key, value))

        def record(name: str, took: float) -> None:
            if i >= WARMUP:
                lat[name].append(took)
                timeouts[name] += took >= TIMEOUT

        async def puts() -> None:  # put/raw pairs, in alternating order
            for k in range(PUTS_PER_ROUND):
                pair = [("put", etcd_put), ("raw", raw_put)]
                for name, step in pair[::-1] if (i + k) % 2 else pair:
                    record(name, await step())

        hard_stop = max(3 * seconds, 120.0)
        t_start = time.perf_counter()
        i = 0
        while True:
            elapsed = time.perf_counter() - t_start
            enough = elapsed >= seconds and min(len(v) for v in lat.values()) >= MIN_SAMPLES
            if enough or elapsed >= hard_stop:
                break
            if i % 2:
                record("cr", await cr_change())
                await puts()
            else:
                await puts()
                record("cr", await cr_change())
            i += 1
        elapsed = time.perf_counter() - t_start

    def measure(name: str, key: str) -> Measure:
        return Measure(name, len(lat[key]), elapsed, pct(lat[key], 0.5), pct(lat[key], 0.99))

    cr = measure("CR change → applied (operator + watcher)", "cr")
    put = measure("etcd put → applied (watcher)", "put")
    base_m = measure("raw etcd watch (baseline)", "raw")
    return [
        _row(cr, cr.p99_ms / 1000.0, 1.0, timeouts["cr"]),
        _row(put, put.p99_ms / base_m.p99_ms if base_m.p99_ms else 0.0, 3.0, timeouts["put"]),
        _row(base_m, 1.0, None, timeouts["raw"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window (>= 30 samples)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args()
    rows = asyncio.run(run(args.seconds))
    ok = print_table("operator", rows)
    print(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
