"""The client wrapper's paho fast paths: shared Properties tables and reads in bulk, against paho's own results."""

from __future__ import annotations

import socket
from typing import Any

import paho.mqtt._packet as packet_module
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_bridge import client as wrapper


def publish_packet(topic: str, payload: bytes, *, mid: int, properties: Properties | None) -> bytes:
    """An MQTT 5 QoS 1 PUBLISH as a broker sends it."""
    topic_bytes = topic.encode()
    props = properties.pack() if properties is not None else b"\x00"
    body = len(topic_bytes).to_bytes(2, "big") + topic_bytes + mid.to_bytes(2, "big") + props + payload
    length = bytearray()
    remaining = len(body)
    while True:
        byte, remaining = remaining % 128, remaining // 128
        length.append(byte | (128 if remaining else 0))
        if not remaining:
            break
    return bytes([0x32]) + bytes(length) + body


def test_the_decoder_builds_the_fast_properties_and_reads_them_as_paho_does():
    assert getattr(packet_module, "Properties") is wrapper._FastProperties  # noqa: B009 (not exported)
    sent = Properties(PacketTypes.PUBLISH)
    sent.ResponseTopic = "devices/d/replies"
    sent.CorrelationData = b"\x01\x02"
    sent.UserProperty = [("a", "1"), ("b", "2")]
    packet = publish_packet("devices/d/commands/x", b"{}", mid=7, properties=sent)
    ours = packet_module.decode_publish(packet[0], packet[2:], paho.MQTTv5)
    reference = Properties(PacketTypes.PUBLISH)
    reference.unpack(packet[2 + 2 + len("devices/d/commands/x") + 2 :])
    assert isinstance(ours.properties, Properties)
    assert ours.properties.json() == reference.json() == sent.json()
    assert (ours.mid, ours.payload, ours.topic) == (7, b"{}", b"devices/d/commands/x")
    ours.properties.clear()
    assert ours.properties.json() == Properties(PacketTypes.PUBLISH).json()


def test_fast_properties_are_as_strict_as_pahos():
    properties: Any = wrapper._FastProperties(PacketTypes.CONNECT)
    properties.ReceiveMaximum = 1000
    assert properties.ReceiveMaximum == 1000
    with pytest.raises(Exception, match="does not apply to packet type"):
        properties.ResponseTopic = "x"  # a PUBLISH property


def test_bulk_reads_handle_every_packet_of_one_read_and_wait_for_the_rest_of_a_split_one():
    received: list[tuple[str, Any, int]] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bulk", protocol=paho.MQTTv5)
    client.on_message = lambda _c, _u, message: received.append((message.topic, message.payload, message.mid))
    client.manual_ack_set(True)
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours
    calls: list[int] = []
    recv = client._sock_recv

    def counted(size: int) -> bytes:
        calls.append(size)
        return recv(size)

    client._sock_recv = counted  # type: ignore[method-assign,assignment]
    wrapper._use_fast_paths(client)
    packets = [publish_packet(f"p/d{n}/telemetry", b'{"n":%d}' % n, mid=n + 1, properties=None) for n in range(4)]
    stream = b"".join(packets)
    split = len(stream) - 5
    try:
        broker.sendall(stream[:split])  # three whole packets and most of the fourth, in one read
        client.loop_read()
        assert [payload for _, payload, _ in received] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        assert calls[0] == wrapper._BufferedReads.SIZE and len(calls) == 2  # one read, then "nothing more yet"
        broker.sendall(stream[split:])
        client.loop_read()
        assert received[-1] == ("p/d3/telemetry", b'{"n":3}', 4) and len(received) == 4
        broker.close()
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST  # end of stream is still seen
    finally:
        ours.close()
