"""Device payloads (contract section 1): what is accepted, what each rejection is called."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_bridge.payloads import (
    MAX_METRICS,
    PayloadError,
    parse_event,
    parse_status,
    parse_telemetry,
)

MAX = 64 * 1024


def telemetry(obj, max_payload=MAX):
    return parse_telemetry(_encode(obj), max_payload=max_payload)


def event(obj, max_payload=MAX):
    return parse_event(_encode(obj), max_payload=max_payload)


def _encode(obj):
    return obj if isinstance(obj, bytes) else orjson.dumps(obj)


def reason_of(parse, payload, max_payload=MAX):
    with pytest.raises(PayloadError) as info:
        parse(payload, max_payload=max_payload)
    return info.value.reason


def nested(depth, leaf=1.0):
    """``{"l1": {"l2": ... {"lN": leaf}}}``, i.e. the metric ``l1.l2...lN``."""
    obj = leaf
    for level in range(depth, 0, -1):
        obj = {f"l{level}": obj}
    return obj


# --- telemetry: accepted --------------------------------------------------------------------------------------


def test_telemetry_plain_metrics():
    parsed = telemetry({"temp": 21.5, "hum": 40, "label": "kitchen", "door": True, "fault": None})
    assert parsed.values == {"temp": 21.5, "hum": 40, "label": "kitchen", "door": True, "fault": None}
    assert parsed.device_ts is None
    assert parsed.seq is None


def test_telemetry_ts_and_seq_are_reserved_not_metrics():
    parsed = telemetry({"temp": 1, "ts": 1700000000, "seq": 42})
    assert parsed.values == {"temp": 1}
    assert parsed.device_ts == 1700000000.0
    assert isinstance(parsed.device_ts, float)
    assert parsed.seq == 42


def test_telemetry_null_ts_and_seq_are_absent():
    parsed = telemetry({"temp": 1, "ts": None, "seq": None})
    assert (parsed.device_ts, parsed.seq) == (None, None)


@pytest.mark.parametrize("seq", [0, 1, 2**63 - 1])
def test_telemetry_seq_range_is_a_non_negative_signed_64_bit_integer(seq):
    assert telemetry({"v": 1, "seq": seq}).seq == seq


def test_telemetry_nested_objects_are_flattened_with_dots():
    parsed = telemetry({"gps": {"lat": 1.5, "lon": -2.25}, "temp": 3})
    assert parsed.values == {"gps.lat": 1.5, "gps.lon": -2.25, "temp": 3}


def test_telemetry_reserved_keys_are_metrics_when_nested():
    assert telemetry({"clock": {"ts": 5, "seq": 6}}).values == {"clock.ts": 5, "clock.seq": 6}


def test_telemetry_flattens_up_to_four_levels():
    assert telemetry({"a": {"b": {"c": {"d": 1}}}}).values == {"a.b.c.d": 1}


def test_telemetry_limits_are_inclusive():
    values: dict[str, object] = {f"m{index}": index for index in range(MAX_METRICS)}
    values["x" * 128] = "y" * 1024
    del values["m0"]
    parsed = telemetry(values)
    assert len(parsed.values) == MAX_METRICS
    assert parsed.values["x" * 128] == "y" * 1024


def test_telemetry_flattened_name_of_exactly_128_characters_is_accepted():
    name = "a" * 60 + "." + "b" * 67
    assert telemetry({"a" * 60: {"b" * 67: 1}}).values == {name: 1}


def test_telemetry_dollar_is_allowed_inside_a_name():
    assert telemetry({"a$": 1, "gps": {"$lat": 2}}).values == {"a$": 1, "gps.$lat": 2}


def test_telemetry_payload_of_exactly_max_bytes_is_accepted():
    payload = orjson.dumps({"v": 1})
    assert parse_telemetry(payload, max_payload=len(payload)).values == {"v": 1}


def test_telemetry_large_integers_within_json_range_are_kept():
    assert telemetry(b'{"v": 18446744073709551615}').values == {"v": 2**64 - 1}


# --- telemetry: rejected --------------------------------------------------------------------------------------


TELEMETRY_REJECTIONS = [
    pytest.param(b'{"v": 1}', 7, "too_large", id="too_large"),
    pytest.param(b'{"v": "\xff"}', MAX, "not_utf8", id="not_utf8"),
    pytest.param(b'{"v": "\xed\xa0\x80"}', MAX, "not_utf8", id="utf8_encoded_surrogate"),
    pytest.param(b"", MAX, "not_json", id="empty"),
    pytest.param(b"{", MAX, "not_json", id="truncated"),
    pytest.param(b"temp=21.5", MAX, "not_json", id="not_json"),
    pytest.param(b'{"v": "\\ud800"}', MAX, "not_json", id="lone_surrogate_escape"),
    pytest.param(b"[1, 2]", MAX, "not_object", id="array_payload"),
    pytest.param(b"21.5", MAX, "not_object", id="number_payload"),
    pytest.param(b'"online"', MAX, "not_object", id="string_payload"),
    pytest.param(b"null", MAX, "not_object", id="null_payload"),
    pytest.param(b'{"v": NaN}', MAX, "bad_value", id="nan"),
    pytest.param(b'{"v": Infinity}', MAX, "bad_value", id="infinity"),
    pytest.param(b'{"v": -Infinity}', MAX, "bad_value", id="minus_infinity"),
    pytest.param(b'{"v": 1e400}', MAX, "bad_value", id="overflow_to_inf"),
    pytest.param(b'{"gps": {"lat": -1e400}}', MAX, "bad_value", id="nested_overflow"),
    pytest.param(orjson.dumps({"v": "x" * 1025}), MAX, "string_too_long", id="string_too_long"),
    pytest.param(b'{"v": "a\\u0000b"}', MAX, "nul", id="nul_in_value"),
    pytest.param(orjson.dumps(nested(5)), MAX, "nested_too_deep", id="five_levels"),
    pytest.param(b'{"v": [1, 2]}', MAX, "array", id="array_value"),
    pytest.param(b'{"gps": {"fix": []}}', MAX, "array", id="nested_array"),
    pytest.param(b'{"": 1}', MAX, "bad_metric_name", id="empty_name"),
    pytest.param(b'{"gps": {"": 1}}', MAX, "bad_metric_name", id="empty_nested_name"),
    pytest.param(b'{"$sys": 1}', MAX, "bad_metric_name", id="dollar_name"),
    pytest.param(b'{"$gps": {"lat": 1}}', MAX, "bad_metric_name", id="dollar_nested_name"),
    pytest.param(orjson.dumps({"x" * 129: 1}), MAX, "bad_metric_name", id="name_129"),
    pytest.param(orjson.dumps({"a" * 64: {"b" * 64: 1}}), MAX, "bad_metric_name", id="flattened_name_129"),
    pytest.param(b'{"a\\u0000b": 1}', MAX, "bad_metric_name", id="nul_in_name"),
    pytest.param(b'{"gps.lat": 1, "gps": {"lat": 2}}', MAX, "collision", id="collision"),
    pytest.param(b'{"gps": {"lat": 2}, "gps.lat": 1}', MAX, "collision", id="collision_reversed"),
    pytest.param(b'{"a": {"b.c": 1, "b": {"c": 2}}}', MAX, "collision", id="nested_collision"),
    pytest.param(orjson.dumps({f"m{i}": i for i in range(257)}), MAX, "too_many_metrics", id="257_metrics"),
    pytest.param(
        orjson.dumps({"g": {f"m{i}": i for i in range(200)}, "h": {f"m{i}": i for i in range(57)}}),
        MAX,
        "too_many_metrics",
        id="257_flattened_metrics",
    ),
    pytest.param(b'{"v": 1, "ts": "2024-01-01"}', MAX, "bad_ts", id="ts_string"),
    pytest.param(b'{"v": 1, "ts": true}', MAX, "bad_ts", id="ts_bool"),
    pytest.param(b'{"v": 1, "ts": {"s": 1}}', MAX, "bad_ts", id="ts_object"),
    pytest.param(b'{"v": 1, "ts": 1e400}', MAX, "bad_value", id="ts_infinite"),
    pytest.param(b'{"v": 1, "seq": -1}', MAX, "bad_seq", id="seq_negative"),
    pytest.param(b'{"v": 1, "seq": true}', MAX, "bad_seq", id="seq_bool"),
    pytest.param(b'{"v": 1, "seq": 1.0}', MAX, "bad_seq", id="seq_float"),
    pytest.param(b'{"v": 1, "seq": "1"}', MAX, "bad_seq", id="seq_string"),
    pytest.param(b'{"v": 1, "seq": 9223372036854775808}', MAX, "bad_seq", id="seq_2_63"),
    pytest.param(b"{}", MAX, "no_metrics", id="empty_object"),
    pytest.param(b'{"ts": 1, "seq": 2}', MAX, "no_metrics", id="only_reserved"),
    pytest.param(b'{"gps": {}}', MAX, "no_metrics", id="only_empty_object"),
]


@pytest.mark.parametrize(("payload", "max_payload", "reason"), TELEMETRY_REJECTIONS)
def test_telemetry_rejections(payload, max_payload, reason):
    assert reason_of(parse_telemetry, payload, max_payload) == reason


def test_payload_error_names_the_offending_metric():
    with pytest.raises(PayloadError, match=r"gps\.fix"):
        telemetry({"gps": {"fix": [1]}})


def test_payload_error_is_a_value_error():
    assert issubclass(PayloadError, ValueError)


# --- status ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "online"),
    [
        (b"online", True),
        (b"offline", False),
        (b" online\n", True),
        (b"offline\r\n", False),
        (b'{"online": true}', True),
        (b'{"online": false}', False),
        (b'{"online": true, "reason": "boot"}', True),
    ],
)
def test_status_accepted(payload, online):
    assert parse_status(payload, max_payload=MAX) is online


@pytest.mark.parametrize(
    ("payload", "max_payload", "reason"),
    [
        pytest.param(b"", MAX, "bad_status", id="empty"),
        pytest.param(b"  \n", MAX, "bad_status", id="blank"),
        pytest.param(b'"online"', MAX, "bad_status", id="json_string"),
        pytest.param(b"true", MAX, "bad_status", id="json_true"),
        pytest.param(b"{}", MAX, "bad_status", id="no_online_key"),
        pytest.param(b'{"online": 1}', MAX, "bad_status", id="online_int"),
        pytest.param(b'{"online": "yes"}', MAX, "bad_status", id="online_string"),
        pytest.param(b"[true]", MAX, "bad_status", id="array"),
        pytest.param(b"ONLINE", MAX, "bad_status", id="uppercase"),
        pytest.param(b"\xff", MAX, "bad_status", id="not_utf8_text"),
        pytest.param(b'{"online": "\xff"}', MAX, "not_utf8", id="not_utf8_json"),
        pytest.param(b'{"online": true}', 8, "too_large", id="too_large_json"),
        pytest.param(b" " * 100 + b"online", 64, "too_large", id="too_large_plain_text"),
    ],
)
def test_status_rejections(payload, max_payload, reason):
    assert reason_of(parse_status, payload, max_payload) == reason


# --- events ---------------------------------------------------------------------------------------------------


def test_event_minimal():
    parsed = event({"name": "door_open", "severity": "info"})
    assert (parsed.name, parsed.severity, parsed.message, parsed.data) == ("door_open", "info", None, {})


@pytest.mark.parametrize("severity", ["info", "warning", "critical"])
def test_event_severities(severity):
    assert event({"name": "x", "severity": severity}).severity == severity


def test_event_extra_keys_are_kept_as_data():
    parsed = event(
        {
            "name": "overheat",
            "severity": "critical",
            "message": "too hot",
            "temp": 91.5,
            "zones": [1, 2, {"id": "z3"}],
            "meta": {"fw": "1.2"},
            "ts": 1700000000,
        }
    )
    assert parsed.message == "too hot"
    assert parsed.data == {"temp": 91.5, "zones": [1, 2, {"id": "z3"}], "meta": {"fw": "1.2"}, "ts": 1700000000}


def test_event_name_limit_is_inclusive():
    assert event({"name": "n" * 128, "severity": "info"}).name == "n" * 128


def test_event_message_limit_is_inclusive():
    assert event({"name": "n", "severity": "info", "message": "m" * 1024}).message == "m" * 1024


def test_event_null_message_is_absent():
    assert event({"name": "n", "severity": "info", "message": None}).message is None


EVENT_REJECTIONS = [
    pytest.param(b'{"name": "x", "severity": "info"}', 10, "too_large", id="too_large"),
    pytest.param(b'{"name": "\xc3", "severity": "info"}', MAX, "not_utf8", id="not_utf8"),
    pytest.param(b"door open", MAX, "not_json", id="not_json"),
    pytest.param(b'["x"]', MAX, "not_object", id="array"),
    pytest.param(b'{"severity": "info"}', MAX, "bad_event_name", id="no_name"),
    pytest.param(b'{"name": "", "severity": "info"}', MAX, "bad_event_name", id="empty_name"),
    pytest.param(b'{"name": 5, "severity": "info"}', MAX, "bad_event_name", id="int_name"),
    pytest.param(b'{"name": ["x"], "severity": "info"}', MAX, "bad_event_name", id="list_name"),
    pytest.param(orjson.dumps({"name": "n" * 129, "severity": "info"}), MAX, "bad_event_name", id="long_name"),
    pytest.param(b'{"name": "a\\u0000", "severity": "info"}', MAX, "bad_event_name", id="nul_name"),
    pytest.param(b'{"name": "x"}', MAX, "bad_severity", id="no_severity"),
    pytest.param(b'{"name": "x", "severity": "INFO"}', MAX, "bad_severity", id="uppercase_severity"),
    pytest.param(b'{"name": "x", "severity": "error"}', MAX, "bad_severity", id="unknown_severity"),
    pytest.param(b'{"name": "x", "severity": 1}', MAX, "bad_severity", id="int_severity"),
    pytest.param(b'{"name": "x", "severity": ["info"]}', MAX, "bad_severity", id="list_severity"),
    pytest.param(b'{"name": "x", "severity": {"level": "info"}}', MAX, "bad_severity", id="object_severity"),
    pytest.param(b'{"name": "x", "severity": "info", "message": 5}', MAX, "bad_message", id="int_message"),
    pytest.param(b'{"name": "x", "severity": "info", "message": {}}', MAX, "bad_message", id="object_message"),
    pytest.param(
        orjson.dumps({"name": "x", "severity": "info", "message": "m" * 1025}),
        MAX,
        "string_too_long",
        id="long_message",
    ),
    pytest.param(b'{"name": "x", "severity": "info", "message": "\\u0000"}', MAX, "nul", id="nul_message"),
    pytest.param(b'{"name": "x", "severity": "info", "v": NaN}', MAX, "bad_value", id="nan_data"),
    pytest.param(b'{"name": "x", "severity": "info", "v": [1e400]}', MAX, "bad_value", id="inf_data"),
    pytest.param(
        orjson.dumps({"name": "x", "severity": "info", "v": ["s" * 1025]}),
        MAX,
        "string_too_long",
        id="long_data_string",
    ),
    pytest.param(b'{"name": "x", "severity": "info", "k\\u0000": 1}', MAX, "nul", id="nul_data_key"),
    pytest.param(
        orjson.dumps({"name": "x", "severity": "info", "deep": nested(17)}),
        MAX,
        "nested_too_deep",
        id="deep_data",
    ),
]


@pytest.mark.parametrize(("payload", "max_payload", "reason"), EVENT_REJECTIONS)
def test_event_rejections(payload, max_payload, reason):
    assert reason_of(parse_event, payload, max_payload) == reason


def test_event_data_may_nest_sixteen_levels():
    assert event({"name": "x", "severity": "info", "deep": nested(15)}).data["deep"] == nested(15)


# --- properties -----------------------------------------------------------------------------------------------

LONG = "a" * 1025
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["online", "offline", "info", "warning", "critical", "$x", "", LONG, "\x00"]),
)
json_keys = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["ts", "seq", "name", "severity", "message", "online", "gps", "gps.lat", "lat", "$sys", ""]),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(json_keys, children, max_size=4),
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(json_keys, json_values, max_size=5)
# Objects that get past the name check, so severity, message and data are exercised too.
event_like = st.builds(
    lambda name, severity, rest: {**rest, "name": name, "severity": severity},
    st.one_of(st.text(min_size=1, max_size=8), json_values),
    st.one_of(st.sampled_from(["info", "warning", "critical"]), json_values),
    json_objects,
)
PARSERS = [parse_telemetry, parse_status, parse_event]


def _accepts_only_payload_errors(parse, payload, max_payload=MAX):
    try:
        return parse(payload, max_payload=max_payload)
    except PayloadError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return None


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PARSERS), st.binary(max_size=200), st.integers(min_value=0, max_value=300))
def test_parsers_raise_only_payload_errors_for_arbitrary_bytes(parse, payload, max_payload):
    _accepts_only_payload_errors(parse, payload, max_payload)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PARSERS), st.one_of(json_values, json_objects, event_like))
def test_parsers_raise_only_payload_errors_for_arbitrary_json(parse, value):
    _accepts_only_payload_errors(parse, orjson.dumps(value))


@settings(max_examples=200, deadline=None)
@given(json_objects)
def test_accepted_telemetry_holds_only_contract_values(value):
    parsed = _accepts_only_payload_errors(parse_telemetry, orjson.dumps(value))
    if parsed is None:
        return
    assert 1 <= len(parsed.values) <= MAX_METRICS
    for name, metric in parsed.values.items():
        assert 1 <= len(name) <= 128
        assert not name.startswith("$")
        assert metric is None or isinstance(metric, bool | int | float | str)
        if isinstance(metric, float):
            assert math.isfinite(metric)
        if isinstance(metric, str):
            assert len(metric) <= 1024
            assert "\x00" not in metric
    assert orjson.loads(orjson.dumps(parsed.values)) == parsed.values


@settings(max_examples=200, deadline=None)
@given(st.one_of(json_objects, event_like))
def test_accepted_events_keep_every_other_key_as_data(value):
    parsed = _accepts_only_payload_errors(parse_event, orjson.dumps(value))
    if parsed is None:
        return
    assert parsed.severity in {"info", "warning", "critical"}
    assert parsed.data == {k: v for k, v in value.items() if k not in {"name", "severity", "message"}}
