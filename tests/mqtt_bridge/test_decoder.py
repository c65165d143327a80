"""MessageDecoder: one MQTT message in, an Observation (or a DecodeError naming reason and device) out."""

from __future__ import annotations

import pytest

from devices.records import EventKind, Observation
from mqtt_bridge.client import InboundMessage
from mqtt_bridge.decoder import DecodeError, MessageDecoder
from mqtt_bridge.topics import Topics

NOW = 1_700_000_000.25


@pytest.fixture
def decoder():
    return MessageDecoder(topics=Topics("devices"), max_payload=1024, clock=lambda: NOW)


def message(topic, payload):
    return InboundMessage(topic=topic, payload=payload, qos=1, retain=False, mid=1, generation=0)


def decode_error(decoder, topic, payload):
    with pytest.raises(DecodeError) as info:
        decoder.decode(message(topic, payload))
    return info.value


def test_telemetry_becomes_a_telemetry_observation(decoder):
    observation = decoder.decode(
        message("devices/s1/telemetry", b'{"temp": 21.5, "gps": {"lat": 1.5}, "ts": 1699999999.5, "seq": 7}')
    )
    assert observation == Observation(
        device_id="s1",
        kind=EventKind.TELEMETRY,
        received_at=NOW,
        body={"values": {"temp": 21.5, "gps.lat": 1.5}},
        device_ts=1699999999.5,
        seq=7,
    )


def test_telemetry_without_ts_or_seq(decoder):
    observation = decoder.decode(message("devices/s1/telemetry", b'{"temp": 1}'))
    assert (observation.device_ts, observation.seq) == (None, None)


@pytest.mark.parametrize(
    ("payload", "online"),
    [(b"online", True), (b"offline", False), (b'{"online": true}', True), (b'{"online": false}', False)],
)
def test_status_becomes_a_status_observation(decoder, payload, online):
    observation = decoder.decode(message("devices/s1/status", payload))
    assert observation == Observation(device_id="s1", kind=EventKind.STATUS, received_at=NOW, body={"online": online})


def test_event_with_message_and_data(decoder):
    payload = b'{"name": "overheat", "severity": "critical", "message": "91 C", "temp": 91, "zone": "a"}'
    observation = decoder.decode(message("devices/s1/events", payload))
    assert observation == Observation(
        device_id="s1",
        kind=EventKind.EVENT,
        received_at=NOW,
        body={"name": "overheat", "severity": "critical", "message": "91 C", "data": {"temp": 91, "zone": "a"}},
    )


def test_event_without_message_or_data_has_neither_key(decoder):
    observation = decoder.decode(message("devices/s1/events", b'{"name": "door", "severity": "info"}'))
    assert observation.body == {"name": "door", "severity": "info"}
    assert observation.kind is EventKind.EVENT
    assert (observation.device_ts, observation.seq) == (None, None)


def test_the_clock_stamps_every_observation():
    ticks = iter([10.0, 20.0])
    decoder = MessageDecoder(topics=Topics("devices"), max_payload=1024, clock=lambda: next(ticks))
    assert decoder.decode(message("devices/s1/status", b"online")).received_at == 10.0
    assert decoder.decode(message("devices/s1/status", b"offline")).received_at == 20.0


def test_multi_level_prefix():
    decoder = MessageDecoder(topics=Topics("site/a"), max_payload=1024, clock=lambda: NOW)
    assert decoder.decode(message("site/a/s1/status", b"online")).device_id == "s1"


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/s1/telemetry", "bad_topic"),
        ("devices/s1/telemetry/x", "bad_topic"),
        ("devices/-s1/telemetry", "bad_device_id"),
        ("devices/s1/commands", "bad_channel"),
        ("devices/s1/commands", "bad_channel"),
    ],
)
def test_topic_errors_have_a_reason_and_no_device(decoder, topic, reason):
    error = decode_error(decoder, topic, b'{"temp": 1}')
    assert (error.reason, error.device) == (reason, None)
    assert topic in str(error)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("devices/s1/telemetry", b"\xff", "not_utf8"),
        ("devices/s1/telemetry", b"nope", "not_json"),
        ("devices/s1/telemetry", b"[1]", "not_object"),
        ("devices/s1/telemetry", b'{"v": NaN}', "bad_value"),
        ("devices/s1/telemetry", b'{"v": [1]}', "array"),
        ("devices/s1/telemetry", b"{}", "no_metrics"),
        ("devices/s1/telemetry", b'{"v": 1, "seq": -1}', "bad_seq"),
        ("devices/s1/telemetry", b'{"v": "' + b"x" * 1100 + b'"}', "too_large"),
        ("devices/s1/status", b"maybe", "bad_status"),
        ("devices/s1/status", b'{"online": "yes"}', "bad_status"),
        ("devices/s1/events", b'{"severity": "info"}', "bad_event_name"),
        ("devices/s1/events", b'{"name": "x", "severity": "fatal"}', "bad_severity"),
        ("devices/s1/events", b'{"name": "x", "severity": "info", "message": 1}', "bad_message"),
    ],
)
def test_payload_errors_name_reason_and_device(decoder, topic, payload, reason):
    error = decode_error(decoder, topic, payload)
    assert (error.reason, error.device) == (reason, "s1")
    assert str(error)


def test_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)
