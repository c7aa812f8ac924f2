"""An asyncio face on confluent-kafka's producer: ``await send(messages)`` returns once
the broker acknowledged every message (acks=all, idempotent), or raises.

* Delivery callbacks run in one poll thread; a call's messages share one
  :class:`_Batch` that resolves a single asyncio future when its last report arrives
  (one ``call_soon_threadsafe`` per call, not per message).
* A call that does not fit the local queue answers RESOURCE_EXHAUSTED before anything
  is enqueued (BufferError mid-call too, though the part already enqueued is then sent).
* Acks that do not arrive within the call's time (``min(produce_timeout_s, deadline)``)
  answer UNAVAILABLE; such messages may still be delivered later (at-least-once: the
  client retries).
* After a broker outage librdkafka's idempotent producer times messages out and bumps
  its epoch, which some brokers (Tansu) answer with PRODUCER_FENCED for every later
  message. Such errors (and fatal ones) replace the producer with a fresh one (new
  producer id); the failed messages of the call are sent once more on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from crm_common.errors import ResourceExhausted, Unavailable

__all__ = ["Delivery", "KafkaProducer", "OutgoingMessage", "producer_config"]

log = logging.getLogger("crm.bilog.producer")

# Errors after which the producer's idempotence state is unusable: start a new producer.
_RESET_CODES = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)
# Of those, the ones that mean "the producer was fenced", not "the broker is down":
# resent at once on the new producer.
_RESEND_CODES = _RESET_CODES - {KafkaError._MSG_TIMED_OUT}


class OutgoingMessage(NamedTuple):
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] | None = None


class Delivery(NamedTuple):
    """Where the broker stored an acknowledged message."""

    partition: int
    offset: int


def producer_config(
    bootstrap: str,
    *,
    compression: str = "zstd",
    linger_ms: int = 5,
    queue_max_messages: int = 200_000,
    message_timeout_ms: int = 30_000,
) -> dict[str, Any]:
    """The producer settings (acks=all, idempotence, compression)."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": compression,
        "linger.ms": linger_ms,
        "queue.buffering.max.messages": queue_max_messages,
        "message.timeout.ms": message_timeout_ms,
        "socket.keepalive.enable": True,
        "logger": logging.getLogger("crm.bilog.librdkafka"),
    }


class _Batch:
    """The delivery reports of one call; resolves ``future`` when all arrived."""

    __slots__ = ("_lock", "future", "loop", "remaining", "results")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.results: list[Delivery | KafkaError | None] = [None] * n
        self.remaining = n
        self._lock = threading.Lock()

    def done(self, index: int, err: KafkaError | None, msg: Any) -> None:
        """librdkafka's on_delivery (poll thread)."""
        with self._lock:
            if self.results[index] is not None:
                return
            self.results[index] = (
                err if err is not None else Delivery(msg.partition(), msg.offset())
            )
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class KafkaProducer:
    """See module doc. ``start()`` begins polling; ``aclose()`` flushes and stops."""

    def __init__(self, config: dict[str, Any], *, produce_timeout_s: float = 15.0) -> None:
        self._config = dict(config)
        self._queue_max = int(config.get("queue.buffering.max.messages", 100_000))
        self.produce_timeout_s = produce_timeout_s
        self._producer = self._new_producer()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resets = 0

    def _new_producer(self) -> Producer:
        return Producer({**self._config, "error_cb": self._on_error})

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's error_cb (poll thread): fatal errors replace the producer."""
        if err.fatal():
            log.error("fatal producer error %s: replacing the producer", err.name())
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._reset, self._producer)
        else:
            log.info("producer error %s: %s", err.name(), err.str())

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._poll_loop, name="crm-bilog-poll", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:  # a callback raised: keep serving the others
                log.exception("producer poll failed")

    def _reset(self, broken: Producer) -> None:
        """Replace ``broken`` (if still current) with a new producer; the old one drains
        in a thread of its own."""
        if broken is not self._producer:
            return
        self._producer = self._new_producer()
        self.resets += 1
        timeout = self._config.get("message.timeout.ms", 30_000) / 1000

        def retire() -> None:
            with contextlib.suppress(Exception):
                broken.flush(timeout)

        threading.Thread(target=retire, name="crm-bilog-retire", daemon=True).start()
        log.warning("producer replaced (idempotence state lost after a delivery failure)")

    @property
    def queued(self) -> int:
        """Messages waiting in the local queue."""
        return len(self._producer)

    async def send(
        self, messages: Sequence[OutgoingMessage], timeout: float | None = None
    ) -> list[Delivery]:
        """Produce ``messages`` and wait for every ack (see module doc)."""
        if not messages:
            return []
        budget = self.produce_timeout_s if timeout is None else min(timeout, self.produce_timeout_s)
        deadline = time.monotonic() + max(budget, 0.05)
        results: list[Delivery | KafkaError | None] = [None] * len(messages)
        pending = list(range(len(messages)))
        for attempt in (1, 2):
            producer = self._producer
            batch = await self._produce(producer, [messages[i] for i in pending], deadline)
            for j, i in enumerate(pending):
                results[i] = batch.results[j]
            failed = [i for i in pending if isinstance(results[i], KafkaError)]
            if not failed:
                break
            codes = {r.code() for i in failed if isinstance(r := results[i], KafkaError)}
            if codes & _RESET_CODES:
                self._reset(producer)
            if attempt == 1 and codes <= _RESEND_CODES and time.monotonic() < deadline:
                pending = failed
                continue
            first = next(r for i in failed if isinstance(r := results[i], KafkaError))
            raise Unavailable(
                f"Kafka did not accept {len(failed)} of {len(messages)} events "
                f"({first.name()}); retry",
                reason="KAFKA_UNAVAILABLE",
            )
        return [r for r in results if isinstance(r, Delivery)]

    async def _produce(
        self, producer: Producer, messages: Sequence[OutgoingMessage], deadline: float
    ) -> _Batch:
        if len(producer) + len(messages) > self._queue_max:
            raise ResourceExhausted(
                "the local produce queue is full; retry later", reason="PRODUCE_QUEUE_FULL"
            )
        batch = _Batch(asyncio.get_running_loop(), len(messages))
        done = batch.done
        produce = producer.produce
        try:
            for i, m in enumerate(messages):
                extra: dict[str, Any] = {}
                if m.timestamp_ms is not None:
                    extra["timestamp"] = m.timestamp_ms
                if m.headers:
                    extra["headers"] = list(m.headers)
                produce(m.topic, m.value, m.key, on_delivery=functools.partial(done, i), **extra)
        except BufferError:
            raise ResourceExhausted(
                "the local produce queue is full; retry later", reason="PRODUCE_QUEUE_FULL"
            ) from None
        except KafkaException as exc:
            raise Unavailable(f"Kafka producer error: {exc}", reason="KAFKA_UNAVAILABLE") from exc
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(batch.future), max(remaining, 0.01))
        except TimeoutError:
            raise Unavailable(
                f"Kafka did not acknowledge {batch.remaining} of {len(messages)} events in "
                "time; retry (some may still arrive)",
                reason="KAFKA_TIMEOUT",
            ) from None
        return batch

    async def ping(self, timeout: float = 2.0) -> None:
        """Raises when no broker answers a metadata request within ``timeout``."""
        await asyncio.to_thread(self._producer.list_topics, timeout=timeout)

    async def ensure_topics(
        self, topics: Sequence[str], partitions: int, replication: int, timeout: float = 10.0
    ) -> None:
        """Create the topics that do not exist yet."""

        def create() -> None:
            admin = AdminClient(
                {
                    "bootstrap.servers": self._config["bootstrap.servers"],
                    "logger": self._config.get("logger", log),
                }
            )
            existing = set(admin.list_topics(timeout=timeout).topics)
            wanted = [t for t in topics if t not in existing]
            if not wanted:
                return
            futures = admin.create_topics(
                [
                    NewTopic(t, num_partitions=partitions, replication_factor=replication)
                    for t in wanted
                ],
                operation_timeout=timeout,
                request_timeout=timeout,
            )
            for topic, future in futures.items():
                try:
                    future.result(timeout)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
                else:
                    log.info("created topic %s", topic, extra={"partitions": partitions})

        await asyncio.to_thread(create)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop the poll thread."""
        await asyncio.to_thread(self._producer.flush, timeout)
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
