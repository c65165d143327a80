"""Connecting: a connection that closes before the broker's CONNACK fails the attempt at once (aiomqtt alone waits out
its 10 s timeout), as behind a proxy or load balancer that accepts while the broker behind it is down."""

from __future__ import annotations

import asyncio
import time

import pytest

from mqtt_bridge.client import BrokerUnavailable, MqttClient, MqttConfig


async def test_a_connection_closed_before_connack_fails_the_attempt_at_once():
    async def accept_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the CONNECT has started to arrive
        writer.close()

    server = await asyncio.start_server(accept_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailable, match="no CONNACK"):
            async with MqttClient(MqttConfig(host="127.0.0.1", port=port, client_id="connack-test")):
                pass
    finally:
        server.close()
    assert time.monotonic() - started < 3, "the attempt waited for the connect timeout"
