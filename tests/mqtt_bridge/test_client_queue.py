"""The MQTT client's incoming queue: QoS 0 overflow is discarded and counted; a QoS 1 message is never stranded."""

from __future__ import annotations

import logging

import aiomqtt
import paho.mqtt.client as paho
import pytest

from mqtt_bridge.client import BrokerUnavailable, MqttClient, MqttConfig


def message(qos: int, mid: int = 0) -> aiomqtt.Message:
    return aiomqtt.Message("devices/d/telemetry", b"{}", qos=qos, retain=False, mid=mid, properties=None)


def client(queue_max: int = 100, receive_maximum: int = 2, drops: list[int] | None = None) -> MqttClient:
    config = MqttConfig(
        host="127.0.0.1", port=1, client_id="queue-test", queue_max=queue_max, receive_maximum=receive_maximum
    )
    return MqttClient(config, on_drop=lambda: (drops if drops is not None else []).append(1))


async def test_qos0_past_the_limit_is_discarded_and_counted_but_qos1_waits_within_the_in_flight_window():
    drops: list[int] = []
    queue = client(queue_max=100, receive_maximum=2, drops=drops)._build()._queue
    for _ in range(100):
        queue.put_nowait(message(qos=0))
    queue.put_nowait(message(qos=0))  # discarded, without an exception (aiomqtt would log a line for each)
    assert queue.qsize() == 100 and drops == [1]
    queue.put_nowait(message(qos=1, mid=1))  # bounded by the broker's in-flight window, not by the QoS 0 limit
    queue.put_nowait(message(qos=1, mid=2))
    assert queue.qsize() == 102 and drops == [1]
    queue.put_nowait(message(qos=1, mid=3))  # a broker ignoring the window
    assert queue.qsize() == 102 and drops == [1, 1]


async def test_a_discarded_qos1_message_makes_the_client_reconnect_once_what_came_before_is_handed_out():
    mqtt = client(queue_max=100, receive_maximum=1)
    mqtt._client = mqtt._build()  # not connected: the test plays the broker by filling its queue
    mqtt._messages = mqtt._client.messages.__aiter__()
    queue = mqtt._client._queue
    for mid in range(101):
        queue.put_nowait(message(qos=1, mid=mid))
    queue.put_nowait(message(qos=1, mid=101))  # discarded
    batch: list = []
    await mqtt.receive_into(batch, max_items=1000, linger=0)  # what came before is still handed out
    assert [m.mid for m in batch] == list(range(101))
    with pytest.raises(BrokerUnavailable, match="redelivers"):
        await mqtt.receive_into([], max_items=1000, linger=0)


async def test_a_fetch_left_waiting_by_the_linger_does_not_keep_a_discarded_message_stranded():
    """After a burst the queue stays empty and an earlier call's fetch waits on it: the client still reconnects."""
    mqtt = client(queue_max=100, receive_maximum=1)
    mqtt._client = mqtt._build()
    mqtt._messages = mqtt._client.messages.__aiter__()
    queue = mqtt._client._queue
    for mid in range(101):
        queue.put_nowait(message(qos=1, mid=mid))
    queue.put_nowait(message(qos=1, mid=101))  # discarded
    batch: list = []
    await mqtt.receive_into(batch, max_items=1000, linger=0.01)  # the linger leaves a fetch waiting
    assert len(batch) == 101 and mqtt._pending is not None
    with pytest.raises(BrokerUnavailable, match="redelivers"):
        await mqtt.receive_into([], max_items=1000, linger=0.01, first_within=1)
    assert mqtt._pending is None


async def test_a_burst_of_discards_is_logged_once_not_once_per_message(caplog):
    """aiomqtt logs nothing (the queue discards without raising QueueFull); ours says where to see the count."""
    built = client(queue_max=1, drops=[])._build()
    for mid in range(50):
        paho_message = paho.MQTTMessage(mid=mid, topic=b"devices/d/telemetry")
        paho_message.payload, paho_message.qos = b"{}", 0
        with caplog.at_level(logging.WARNING):
            built._on_message(built._client, None, paho_message)  # aiomqtt's callback, as paho calls it
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "gateway_mqtt_queue_dropped_total" in lines[0] and "127.0.0.1:1" in lines[0], lines
