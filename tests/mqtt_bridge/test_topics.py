"""MQTT topics (contract section 1): building, parsing and the bridge's subscriptions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_bridge.topics import (
    INBOUND,
    Channel,
    ParsedTopic,
    TopicError,
    Topics,
    validate_prefix,
    validate_shared_group,
)
from tests.devices.test_identifiers import valid_device_ids


@pytest.fixture
def topics():
    return Topics("devices")


# --- building -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (Channel.TELEMETRY, "devices/sensor-1/telemetry"),
        (Channel.STATUS, "devices/sensor-1/status"),
        (Channel.EVENTS, "devices/sensor-1/events"),
        (Channel.REPLIES, "devices/sensor-1/replies"),
    ],
)
def test_device_topic_is_prefix_id_channel(topics, channel, expected):
    assert topics.device("sensor-1", channel) == expected


def test_command_topic_is_prefix_id_commands_name(topics):
    assert topics.command("sensor-1", "set_rate") == "devices/sensor-1/commands/set_rate"


def test_multi_level_prefix_is_used_verbatim():
    assert Topics("site/a/devices").command("s1", "reboot") == "site/a/devices/s1/commands/reboot"


@pytest.mark.parametrize("device_id", ["", "-x", "a/b", "a+", "a#", "a" * 65, "é"])
def test_device_topic_refuses_an_invalid_device_id(topics, device_id):
    with pytest.raises(TopicError) as info:
        topics.device(device_id, Channel.TELEMETRY)
    assert info.value.reason == "bad_device_id"


@pytest.mark.parametrize("name", ["", "a/b", "a.b", "+", "#", "a" * 65, "reboot now"])
def test_command_topic_refuses_an_invalid_command_name(topics, name):
    with pytest.raises(TopicError) as info:
        topics.command("sensor-1", name)
    assert info.value.reason == "bad_command_name"


def test_command_topic_refuses_an_invalid_device_id(topics):
    with pytest.raises(TopicError) as info:
        topics.command("bad/id", "reboot")
    assert info.value.reason == "bad_device_id"


# --- subscriptions ------------------------------------------------------------------------------------------


def test_subscriptions_without_a_shared_group(topics):
    assert topics.subscriptions(None) == [
        "devices/+/telemetry",
        "devices/+/events",
        "devices/+/replies",
    ]
    assert topics.status_filter() == "devices/+/status"


def test_subscriptions_share_telemetry_events_and_replies(topics):
    filters = topics.subscriptions("bridges")
    assert filters == [
        "$share/bridges/devices/+/telemetry",
        "$share/bridges/devices/+/events",
        "$share/bridges/devices/+/replies",
    ]


def test_command_topics_and_the_device_side_filter(topics):
    assert topics.command("pump-1", "reboot") == "devices/pump-1/commands/reboot"
    assert topics.command_filter("pump-1") == "devices/pump-1/commands/+"


def test_empty_shared_group_means_no_sharing(topics):
    assert topics.subscriptions("") == topics.subscriptions(None)


def test_every_subscription_matches_what_parse_accepts(topics):
    for topic_filter in [*topics.subscriptions(None), topics.status_filter()]:
        concrete = topic_filter.replace("+", "sensor-1")
        assert topics.parse(concrete).device_id == "sensor-1"


# --- parsing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "channel"),
    [
        ("devices/sensor-1/telemetry", Channel.TELEMETRY),
        ("devices/sensor-1/status", Channel.STATUS),
        ("devices/sensor-1/events", Channel.EVENTS),
    ],
)
def test_parse_inbound_topics(topics, topic, channel):
    assert topics.parse(topic) == ParsedTopic(device_id="sensor-1", channel=channel)


def test_parse_with_a_multi_level_prefix():
    parsed = Topics("site/a/devices").parse("site/a/devices/s.1/status")
    assert parsed == ParsedTopic(device_id="s.1", channel=Channel.STATUS)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "bad_topic"),
        ("devices", "bad_topic"),
        ("devices/sensor-1", "bad_topic"),
        ("devices/sensor-1/telemetry/extra", "bad_topic"),
        ("devices/sensor-1/commands/reboot", "bad_topic"),
        ("other/sensor-1/telemetry", "bad_topic"),
        ("Devices/sensor-1/telemetry", "bad_topic"),
        ("/devices/sensor-1/telemetry", "bad_topic"),
        ("devices//telemetry", "bad_device_id"),
        ("devices/-x/telemetry", "bad_device_id"),
        ("devices/+/telemetry", "bad_device_id"),
        ("devices/#/telemetry", "bad_device_id"),
        ("devices/" + "a" * 65 + "/telemetry", "bad_device_id"),
        ("devices/capteur-é/telemetry", "bad_device_id"),
        ("devices/sensor-1/commands", "bad_channel"),
        ("devices/sensor-1/Telemetry", "bad_channel"),
        ("devices/sensor-1/", "bad_channel"),
        ("devices/sensor-1/metrics", "bad_channel"),
    ],
)
def test_parse_rejects_topics_outside_the_contract(topics, topic, reason):
    with pytest.raises(TopicError) as info:
        topics.parse(topic)
    assert info.value.reason == reason
    assert info.value.topic == topic


def test_parse_rejects_another_prefix_sharing_the_first_level():
    with pytest.raises(TopicError) as info:
        Topics("site/a").parse("site/b/sensor-1/telemetry")
    assert info.value.reason == "bad_topic"


def test_topic_error_is_a_value_error_naming_the_topic(topics):
    with pytest.raises(ValueError, match=r"devices/x/nope"):
        topics.parse("devices/x/nope")


# --- prefixes and shared groups -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["devices", "a/b/c", "site-1/devices", "x"])
def test_valid_prefixes(prefix):
    assert validate_prefix(prefix) == prefix
    assert Topics(prefix).prefix == prefix


@pytest.mark.parametrize(
    "prefix", ["", "/", "/devices", "devices/", "a//b", "$SYS", "$share/x", "dev+ices", "devices/#", "dev\x00"]
)
def test_invalid_prefixes(prefix):
    with pytest.raises(ValueError, match="invalid topic prefix"):
        validate_prefix(prefix)
    with pytest.raises(ValueError):
        Topics(prefix)


@pytest.mark.parametrize("group", ["bridges", "g1", "a-b_c.d", "$x"])
def test_valid_shared_groups(group):
    assert validate_shared_group(group) == group


@pytest.mark.parametrize("group", ["", "a/b", "a+", "a#", "a\x00"])
def test_invalid_shared_groups(group):
    with pytest.raises(ValueError, match="invalid shared subscription group"):
        validate_shared_group(group)


# --- properties ---------------------------------------------------------------------------------------------

topic_text = st.one_of(
    st.text(max_size=120),
    st.lists(st.sampled_from(["devices", "sensor-1", "telemetry", "status", "events", "", "+", "#", "é"])).map(
        "/".join
    ),
)


@settings(max_examples=200, deadline=None)
@given(topic_text)
def test_parse_raises_only_topic_errors(text):
    topics = Topics("devices")
    try:
        parsed = topics.parse(text)
    except TopicError as exc:
        assert exc.reason in {"bad_topic", "bad_device_id", "bad_channel"}
    else:
        assert parsed.channel in INBOUND
        assert text == topics.device(parsed.device_id, parsed.channel)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["devices", "a/b", "site-1/x/y"]),
    valid_device_ids,
    st.sampled_from(list(INBOUND)),
)
def test_device_topics_round_trip_through_parse(prefix, device_id, channel):
    topics = Topics(prefix)
    assert topics.parse(topics.device(device_id, channel)) == ParsedTopic(device_id, channel)
