"""The one module that reads the process environment (and an optional ``.env`` file).

Everything else reads Django settings. Each getter names the variable it reads in its error, so a broken
configuration stops start-up with one clear line.
"""

from __future__ import annotations

import builtins
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``KEY=value`` file (``#`` comments, optional quotes); a missing file is empty."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ImproperlyConfigured(f"{path}:{number}: expected KEY=value, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def read_credentials(directory: Path) -> dict[str, str]:
    """Read systemd credentials (``LoadCredential=DJANGO_SECRET_KEY:/etc/...``): one file per variable, named
    like it, its content the value (one trailing newline dropped)."""
    values: dict[str, str] = {}
    if not directory.is_dir():
        raise ImproperlyConfigured(f"CREDENTIALS_DIRECTORY={str(directory)!r} is not a directory")
    for file in sorted(directory.iterdir()):
        if file.name.isidentifier() and file.is_file():
            values[file.name] = file.read_text(encoding="utf-8").removesuffix("\n")
    return values


class Env:
    """Typed access to configuration values: the process environment first, then systemd credentials, then the
    ``.env`` file."""

    def __init__(
        self,
        environ: Mapping[builtins.str, builtins.str],
        dotenv: Mapping[builtins.str, builtins.str] | None = None,
        credentials: Mapping[builtins.str, builtins.str] | None = None,
    ) -> None:
        self._values = {**(dotenv or {}), **(credentials or {}), **environ}

    @classmethod
    def load(cls, base_dir: Path) -> Env:
        dotenv_path = Path(os.environ.get("GATEWAY_ENV_FILE", base_dir / ".env"))
        credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        credentials = read_credentials(Path(credentials_dir)) if credentials_dir else None
        return cls(os.environ, read_dotenv(dotenv_path), credentials)

    def raw(self, name: builtins.str) -> builtins.str | None:
        return self._values.get(name)

    def str(self, name: builtins.str, default: builtins.str | None = None) -> builtins.str:
        value = self._values.get(name, default)
        if value is None:
            raise ImproperlyConfigured(f"{name} is required but not set")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._values.get(name)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use 1/0, true/false, yes/no)")

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        value = self._values.get(name)
        if value is None or value.strip() == "":
            return default
        try:
            number = int(value.strip())
        except ValueError:
            raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None
        if minimum is not None and number < minimum:
            raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
        if maximum is not None and number > maximum:
            raise ImproperlyConfigured(f"{name}={number} is above the maximum {maximum}")
        return number

    def float(self, name: builtins.str, default: builtins.float, *, minimum: builtins.float = 0.0) -> builtins.float:
        value = self._values.get(name)
        if value is None or value.strip() == "":
            return default
        try:
            number = float(value.strip())
        except ValueError:
            raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None
        if not math.isfinite(number):
            raise ImproperlyConfigured(f"{name}={value!r} is not a finite number")
        if not number >= minimum:
            raise ImproperlyConfigured(f"{name}={number} is below the minimum {minimum}")
        return number

    def list(self, name: builtins.str, default: builtins.list[builtins.str]) -> builtins.list[builtins.str]:
        value = self._values.get(name)
        if value is None:
            return default
        return [item.strip() for item in value.split(",") if item.strip()]

    def bind(self, name: builtins.str) -> tuple[builtins.str, builtins.int] | None:
        """``HOST:PORT`` (``[::1]:9101`` for IPv6), or None when unset or empty."""
        value = (self._values.get(name) or "").strip()
        if not value:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ImproperlyConfigured(f"{name}={value!r} is not HOST:PORT (for example 127.0.0.1:9101)")
        return host.strip("[]"), int(port)

    def choice(self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]) -> builtins.str:
        value = (self._values.get(name) or default).strip()
        if value not in choices:
            raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
        return value


def database_config(url: str, *, name: str = "DATABASE_URL", base_dir: Path) -> dict[str, Any]:
    """Turn ``sqlite:///path`` or ``postgres://user:pass@host:port/db`` into a Django DATABASES entry."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if path.startswith("/"):
            path = path[1:]  # sqlite:///db.sqlite3 is relative; sqlite:////abs/path is absolute
        if not path:
            raise ImproperlyConfigured(f"{name}={url!r} names no SQLite file")
        file = Path(path) if Path(path).is_absolute() else base_dir / path
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(file),
            # Keep connections: reopening SQLite on every call cost a third of the command round trip.
            "CONN_MAX_AGE": 600,
            "CONN_HEALTH_CHECKS": True,
            # Ids must become visible in id order (contract section 4): one writer at a time, WAL for readers.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    if parts.scheme in {"postgres", "postgresql", "pgsql"}:
        dbname = unquote(parts.path.lstrip("/"))
        if not dbname:
            raise ImproperlyConfigured(f"{name}={_redact(url)!r} names no database")
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        try:
            port = parts.port
        except ValueError:
            raise ImproperlyConfigured(f"{name}={_redact(url)!r}: port is not a number from 1 to 65535") from None
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": dbname,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(port or ""),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": options,
        }
    raise ImproperlyConfigured(f"{name}={_redact(url)!r}: scheme must be sqlite:// or postgres://")


@dataclass(frozen=True)
class MqttUrl:
    """A parsed ``MQTT_URL``."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    def display(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def mqtt_url(url: str, *, name: str = "MQTT_URL") -> MqttUrl:
    """Parse ``mqtt://user:pass@host:1883`` or ``mqtts://host:8883``."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"}:
        raise ImproperlyConfigured(f"{name}={_redact(url)!r}: scheme must be mqtt:// or mqtts://")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ImproperlyConfigured(f"{name}={_redact(url)!r}: port is not a number from 1 to 65535")
    if not parts.hostname:
        raise ImproperlyConfigured(f"{name}={_redact(url)!r} names no host")
    tls = parts.scheme == "mqtts"
    return MqttUrl(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def redis_url(url: str, *, name: str = "REDIS_URL") -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(f"{name}={_redact(url)!r}: scheme must be redis://, rediss:// or unix://")
    return url


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
