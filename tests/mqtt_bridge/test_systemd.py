"""mqtt_bridge.systemd: sd_notify datagrams on a real AF_UNIX socket, the watchdog keep-alive, READY/STATUS."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest

from mqtt_bridge.bridge import BridgeState
from mqtt_bridge.systemd import Notifier, ServiceStatus, SystemdSettings, keep_alive


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket like the one systemd listens on; yields (address for NOTIFY_SOCKET, receive function)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0)

    def received() -> list[str]:
        out = []
        while True:
            try:
                out.append(sock.recv(4096).decode())
            except BlockingIOError:
                return out

    yield str(path), received
    sock.close()


def test_notify_sends_one_datagram_of_lines(notify_socket):
    address, received = notify_socket
    notifier = Notifier(address)
    notifier.ready("connected")
    notifier.status("still connected")
    notifier.stopping("bye")
    assert received() == [
        f"READY=1\nSTATUS=connected\nMAINPID={os.getpid()}",
        "STATUS=still connected",
        "STOPPING=1\nSTATUS=bye",
    ]
    assert notifier.sent == 3


def test_abstract_namespace_address():
    name = f"gateway-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        Notifier("@" + name).status("hello")
        assert sock.recv(100) == b"STATUS=hello"
    finally:
        sock.close()


def test_without_a_socket_nothing_is_sent_and_nothing_fails():
    notifier = Notifier(None)
    notifier.ready("x")
    assert not notifier.enabled and notifier.sent == 0


def test_an_unreachable_socket_is_logged_not_raised(tmp_path, caplog):
    Notifier(str(tmp_path / "gone")).status("x")
    assert "sd_notify" in caplog.text


@pytest.mark.parametrize(
    ("values", "interval"),
    [
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000"}, 1.0),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"NOTIFY_SOCKET": "/run/x"}, None),
        ({"WATCHDOG_USEC": "2000000"}, None),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "junk"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(values, interval):
    assert SystemdSettings.from_settings(values).watchdog_interval() == interval


def state(*, connected: bool, attempted: bool, detail: str = "", presence: bool = True) -> BridgeState:
    return BridgeState(connected=connected, attempted=attempted, detail=detail, records_presence=presence)


def test_ready_once_after_the_first_attempt_then_status_on_change(notify_socket):
    address, received = notify_socket
    status = ServiceStatus(Notifier(address), where="mqtt://broker:1883")
    status(state(connected=False, attempted=False))
    status(state(connected=False, attempted=True, detail="connection refused"))
    status(state(connected=False, attempted=True, detail="connection refused"))  # unchanged: nothing sent
    status(state(connected=True, attempted=True, presence=False))
    assert received() == [
        "STATUS=connecting to mqtt://broker:1883",
        f"READY=1\nSTATUS=waiting for the broker at mqtt://broker:1883: connection refused\nMAINPID={os.getpid()}",
        "STATUS=connected to mqtt://broker:1883; presence recorded by another bridge",
    ]


async def test_keep_alive_stops_while_the_event_loop_is_blocked(notify_socket):
    address, received = notify_socket
    task = asyncio.create_task(keep_alive(Notifier(address), 0.05))
    await asyncio.sleep(0.3)
    alive = len(received())
    time.sleep(0.5)  # noqa: ASYNC251  (on purpose: a blocked loop, so no keep-alive can be sent)
    blocked = len(received())
    await asyncio.sleep(0.2)
    task.cancel()
    assert alive >= 4
    assert blocked == 0, "keep-alives were sent while the event loop was blocked"
    assert set(received()) == {"WATCHDOG=1"}
