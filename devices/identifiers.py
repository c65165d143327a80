"""The grammar of names that cross trust boundaries (contract section 1), in one place.

Device ids and command names end up in MQTT topics, URLs and log lines, so they are checked against a strict
grammar before they are used anywhere.
"""

from __future__ import annotations

import re

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
COMMAND_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class InvalidIdentifier(ValueError):
    """A device id or command name outside the contract's grammar."""


def is_device_id(value: object) -> bool:
    return isinstance(value, str) and DEVICE_ID_RE.fullmatch(value) is not None


def require_device_id(value: object) -> str:
    if not is_device_id(value):
        raise InvalidIdentifier(
            f"invalid device id {value!r}: expected 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    assert isinstance(value, str)
    return value


def is_command_name(value: object) -> bool:
    return isinstance(value, str) and COMMAND_NAME_RE.fullmatch(value) is not None
