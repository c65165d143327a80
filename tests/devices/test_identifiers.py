"""Device ids and command names (contract section 1): the grammar both the bridge and the web side rely on."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.identifiers import InvalidIdentifier, is_command_name, is_device_id, require_device_id

ID_FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
ID_REST = ID_FIRST + "_.-"
NAME_CHARS = ID_FIRST + "_-"

valid_device_ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(ID_FIRST),
    st.text(alphabet=ID_REST, max_size=63),
)


@pytest.mark.parametrize(
    "device_id",
    ["a", "Z", "0", "sensor-1", "sensor_1", "sensor.1", "a" * 64, "9" + "-" * 63, "A.b_c-D", "1.2.3"],
)
def test_device_id_accepts_the_contract_grammar(device_id):
    assert is_device_id(device_id)
    assert require_device_id(device_id) == device_id


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "a" * 65,
        "-sensor",
        "_sensor",
        ".sensor",
        "sensor/1",
        "sensor+",
        "sensor#",
        "sensor 1",
        "sensor\n",
        "sensor\x00",
        "$SYS",
        "capteur-é",
        "\u0661\u0662\u0663",  # Arabic-Indic digits
        "\uff53\uff45\uff4e\uff53\uff4f\uff52",  # fullwidth "sensor"
        "sensor:1",
    ],
)
def test_device_id_rejects_everything_else(device_id):
    assert not is_device_id(device_id)
    with pytest.raises(InvalidIdentifier, match="invalid device id"):
        require_device_id(device_id)


@pytest.mark.parametrize("value", [None, 1, b"sensor", ["sensor"], 1.5])
def test_device_id_rejects_non_strings(value):
    assert not is_device_id(value)
    with pytest.raises(InvalidIdentifier):
        require_device_id(value)


@pytest.mark.parametrize("name", ["reboot", "set_rate", "set-rate", "_private", "-x", "0", "a" * 64, "A_B-c9"])
def test_command_name_accepts_the_contract_grammar(name):
    assert is_command_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, "set.rate", "set/rate", "set rate", "+", "#", "reboot\n", "é", "\u0661", None, 7, b"reboot"],
)
def test_command_name_rejects_everything_else(name):
    assert not is_command_name(name)


@settings(max_examples=200, deadline=None)
@given(valid_device_ids)
def test_generated_valid_device_ids_are_accepted(device_id):
    assert is_device_id(device_id)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_device_id_agrees_with_an_independent_ascii_reading_of_the_grammar(text):
    expected = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", text, flags=re.ASCII) is not None
    assert is_device_id(text) is expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_command_name_agrees_with_an_independent_ascii_reading_of_the_grammar(text):
    expected = re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text, flags=re.ASCII) is not None
    assert is_command_name(text) is expected
