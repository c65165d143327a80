"""The systemd service protocol, without libsystemd: ``sd_notify(3)`` datagrams and the watchdog keep-alive.

``runbridge`` under ``Type=notify`` says ``READY=1`` once it has tried the broker, keeps ``STATUS=`` current, sends
``WATCHDOG=1`` from a task on its event loop (a blocked loop stops the keep-alives and systemd restarts the unit),
and says ``STOPPING=1`` on SIGTERM. Without ``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mqtt_bridge.bridge import BridgeState

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SystemdSettings:
    """What systemd put in the service's environment (read by ``config.env``, passed through settings)."""

    notify_socket: str | None = None
    watchdog_usec: int | None = None
    watchdog_pid: int | None = None

    @classmethod
    def from_settings(cls, values: Mapping[str, str | None]) -> SystemdSettings:
        usec, pid = values.get("WATCHDOG_USEC"), values.get("WATCHDOG_PID")
        return cls(
            notify_socket=values.get("NOTIFY_SOCKET") or None,
            watchdog_usec=int(usec) if usec and usec.isdigit() and int(usec) > 0 else None,
            watchdog_pid=int(pid) if pid and pid.isdigit() else None,
        )

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half the timeout, as sd_watchdog_enabled(3) advises), or None."""
        if self.watchdog_usec is None or self.notify_socket is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None  # the watchdog is meant for another process (e.g. a parent shell)
        return self.watchdog_usec / 2_000_000


class Notifier:
    """Sends ``KEY=value`` lines to the service manager's notification socket."""

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> None:
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self._address)
            self.sent += 1
        except OSError as exc:  # systemd gone or socket unreachable: the service itself must keep running
            logger.warning("sd_notify to %r failed: %s", self._address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class ServiceStatus:
    """Turns the bridge's states into ``READY=1`` (once, after its first connection attempt, whatever the outcome:
    a broker that is down at boot must not fail the unit, the bridge keeps retrying) and ``STATUS=`` lines."""

    def __init__(self, notifier: Notifier, *, where: str) -> None:
        self._notifier = notifier
        self._where = where
        self._last = ""
        self.ready = False

    def __call__(self, state: BridgeState) -> None:
        text = state.describe(self._where)
        if not self.ready and state.attempted:
            self.ready = True
            self._notifier.ready(text)
        elif text != self._last:
            self._notifier.status(text)
        self._last = text


async def keep_alive(notifier: Notifier, interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds for as long as this event loop runs tasks."""
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
