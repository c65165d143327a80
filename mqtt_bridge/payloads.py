"""Validation of device payloads (contract section 1). Pure functions: bytes in, plain data or PayloadError out."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

MAX_METRICS = 256
MAX_STRING = 1024
MAX_DEPTH = 4
MAX_METRIC_NAME = 128
MAX_EVENT_NAME = 128
SEVERITIES = frozenset({"info", "warning", "critical"})
RESERVED_TELEMETRY_KEYS = frozenset({"ts", "seq"})
EVENT_KEYS = frozenset({"name", "severity", "message"})
SEQ_MAX = 2**63 - 1


class PayloadError(ValueError):
    """A payload outside the contract. ``reason`` is a short metric label; the message names the value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Telemetry:
    values: dict[str, Any]
    device_ts: float | None
    seq: int | None


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    name: str
    severity: str
    message: str | None
    data: dict[str, Any]


def _load_json(payload: bytes, max_payload: int) -> Any:
    if len(payload) > max_payload:
        raise PayloadError("too_large", f"payload of {len(payload)} bytes exceeds {max_payload}")
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        _reject_non_finite(payload)
        raise PayloadError("not_json", f"payload is not JSON: {exc}") from None


def _non_finite(literal: str) -> float:
    raise PayloadError("bad_value", f"{literal} is not a finite number")


def _parse_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        _non_finite(literal[:40])
    return number


def _reject_non_finite(payload: bytes) -> None:
    """orjson refuses NaN, Infinity and numbers that overflow to infinity as "not JSON"; name them ``bad_value``
    (only on the error path: the standard library parser accepts them, so it can tell)."""
    try:
        json.loads(payload, parse_constant=_non_finite, parse_float=_parse_float)
    except PayloadError:
        raise
    except (ValueError, RecursionError):
        pass


def _load_object(payload: bytes, max_payload: int, what: str) -> dict[str, Any]:
    data = _load_json(payload, max_payload)
    if not isinstance(data, dict):
        raise PayloadError("not_object", f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _optional_string(data: dict[str, Any], key: str, *, reason: str) -> str | None:
    """``data[key]`` when it is a bounded string without NUL, ``None`` when absent; ``reason`` otherwise."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(reason, f"{key} {value!r} is not a string")
    return _check_string(value, key)


def _check_string(value: str, where: str) -> str:
    if len(value) > MAX_STRING:
        raise PayloadError("string_too_long", f"{where}: string of {len(value)} characters exceeds {MAX_STRING}")
    if "\x00" in value:
        raise PayloadError("nul", f"{where}: string contains NUL")
    return value


def _check_json_value(value: Any, where: str, depth: int = 0) -> None:
    """Any JSON (for event data), but finite numbers, bounded strings, no NUL and bounded depth."""
    if depth > 16:
        raise PayloadError("nested_too_deep", f"{where}: nested more than 16 levels")
    if isinstance(value, str):
        _check_string(value, where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise PayloadError("bad_value", f"{where}: {value!r} is not a finite number")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key, f"{where} key")
            _check_json_value(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]", depth + 1)


def _flatten(obj: dict[str, Any], prefix: str, depth: int, out: dict[str, Any]) -> None:
    for key, value in obj.items():
        if not isinstance(key, str) or not key:
            raise PayloadError("bad_metric_name", f"metric name {key!r} is empty")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                raise PayloadError("nested_too_deep", f"metric {name!r} is nested more than {MAX_DEPTH} levels")
            _flatten(value, f"{name}.", depth + 1, out)
            continue
        if len(name) > MAX_METRIC_NAME or name.startswith("$") or "\x00" in name:
            raise PayloadError("bad_metric_name", f"metric name {name[:140]!r} is invalid")
        if isinstance(value, list):
            raise PayloadError("array", f"metric {name!r} is an array")
        if isinstance(value, float) and not math.isfinite(value):
            raise PayloadError("bad_value", f"metric {name!r} is not a finite number")
        if isinstance(value, str):
            _check_string(value, f"metric {name!r}")
        if name in out:
            raise PayloadError("collision", f"metric name {name!r} appears twice after flattening")
        out[name] = value
        if len(out) > MAX_METRICS:
            raise PayloadError("too_many_metrics", f"more than {MAX_METRICS} metrics")


def parse_telemetry(payload: bytes, *, max_payload: int) -> Telemetry:
    data = _load_object(payload, max_payload, "telemetry")
    device_ts = data.get("ts")
    if device_ts is not None:
        if isinstance(device_ts, bool) or not isinstance(device_ts, int | float) or not math.isfinite(device_ts):
            raise PayloadError("bad_ts", f"ts {device_ts!r} is not a finite number of unix seconds")
        device_ts = float(device_ts)
    seq = data.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= SEQ_MAX):
        raise PayloadError("bad_seq", f"seq {seq!r} is not a non-negative 64-bit integer")
    values: dict[str, Any] = {}
    _flatten({k: v for k, v in data.items() if k not in RESERVED_TELEMETRY_KEYS}, "", 1, values)
    if not values:
        raise PayloadError("no_metrics", "telemetry carries no metrics")
    return Telemetry(values=values, device_ts=device_ts, seq=seq)


def parse_status(payload: bytes, *, max_payload: int) -> bool:
    """``online`` / ``offline`` as plain text, or ``{"online": bool}``; returns whether the device is online."""
    if len(payload) > max_payload:
        raise PayloadError("too_large", f"payload of {len(payload)} bytes exceeds {max_payload}")
    text = payload.strip()
    if text == b"online":
        return True
    if text == b"offline":
        return False
    if not text.startswith(b"{"):
        raise PayloadError("bad_status", f'status must be online, offline or {{"online": bool}}, got {payload[:60]!r}')
    data = _load_json(payload, max_payload)
    if isinstance(data, dict) and isinstance(data.get("online"), bool):
        return bool(data["online"])
    raise PayloadError("bad_status", f'status must be online, offline or {{"online": bool}}, got {payload[:60]!r}')


@dataclass(frozen=True, slots=True)
class CommandReply:
    command_id: str
    ok: bool
    result: Any
    error: str | None


MAX_COMMAND_ID = 64


def parse_reply(payload: bytes, *, max_payload: int) -> CommandReply:
    """``{"id": str, "ok": bool, "result": any?, "error": str?}`` (contract section 1)."""
    data = _load_object(payload, max_payload, "reply")
    command_id = data.get("id")
    if not isinstance(command_id, str) or not 1 <= len(command_id) <= MAX_COMMAND_ID or "\x00" in command_id:
        raise PayloadError("bad_reply_id", f"reply id {command_id!r} must be a string of 1-{MAX_COMMAND_ID} characters")
    ok = data.get("ok")
    if not isinstance(ok, bool):
        raise PayloadError("bad_reply_ok", f"reply ok {ok!r} must be true or false")
    error = _optional_string(data, "error", reason="bad_reply_error")
    result = data.get("result")
    _check_json_value(result, "result")
    return CommandReply(command_id=command_id, ok=ok, result=result, error=error)


def parse_event(payload: bytes, *, max_payload: int) -> DeviceEvent:
    data = _load_object(payload, max_payload, "event")
    name = data.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_EVENT_NAME or "\x00" in name:
        raise PayloadError("bad_event_name", f"event name {name!r} must be a string of 1-{MAX_EVENT_NAME} characters")
    severity = data.get("severity")
    if not isinstance(severity, str) or severity not in SEVERITIES:
        raise PayloadError("bad_severity", f"severity {severity!r} is not one of info, warning, critical")
    message = _optional_string(data, "message", reason="bad_message")
    extra = {key: value for key, value in data.items() if key not in EVENT_KEYS}
    _check_json_value(extra, "data")
    return DeviceEvent(name=name, severity=str(severity), message=message, data=extra)
