"""WriteGate: a WebSocket's sender waits while the client does not read (Twisted's send buffer is full)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from gateway.backpressure import WriteGate, WriteGateMiddleware


class Transport:
    """The parts of Twisted's transport the gate uses: one registered producer at a time."""

    def __init__(self, producer: Any = None) -> None:
        self.producer = producer
        self.streaming: bool | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None, "Twisted refuses a second producer"
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None


class Protocol:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport


async def handle_reply(protocol: Protocol, message: dict[str, Any]) -> None:
    """Stands for Daphne's ``Server.handle_reply``."""


def daphne_send(transport: Transport) -> Any:
    return functools.partial(handle_reply, Protocol(transport))


async def test_the_gate_replaces_the_stale_http_producer_as_the_transports_streaming_producer():
    transport = Transport(producer=object())  # Daphne's HTTP channel, which handed the transport over
    gate = WriteGate.for_send(daphne_send(transport))
    assert transport.producer is gate and transport.streaming is True


async def test_a_shut_gate_waits_and_reports_a_client_that_reads_nothing():
    gate = WriteGate.for_send(daphne_send(Transport()))
    assert await gate.wait_open(0.01)
    gate.pauseProducing()  # Twisted: the send buffer is over its bound
    assert not await gate.wait_open(0.05)
    asyncio.get_running_loop().call_later(0.02, gate.resumeProducing)  # Twisted: the buffer drained
    assert await gate.wait_open(1.0)


async def test_a_lost_connection_opens_the_gate():
    gate = WriteGate()
    gate.pauseProducing()
    gate.stopProducing()
    assert await gate.wait_open(0.01)


async def test_without_daphne_there_is_nothing_to_watch_and_the_gate_stays_open():
    async def send(message: dict[str, Any]) -> None:
        pass

    gate = WriteGate.for_send(send)
    assert await gate.wait_open(0.01)


async def test_the_middleware_puts_the_gate_in_the_scope():
    seen: dict[str, Any] = {}

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    transport = Transport()
    await WriteGateMiddleware(inner)({"type": "websocket"}, None, daphne_send(transport))
    assert seen["write_gate"] is transport.producer
