"""An MQTT broker inside the gateway process (amqtt), for the one-command default and demos.

amqtt speaks MQTT 3.1.1 and keeps no persistent sessions (seen with amqtt 0.12.1: unacknowledged and offline-
queued QoS 1 messages are not redelivered after a reconnect), so durability across gateway restarts needs a real
broker such as Mosquitto. See docs/protocol.md.
"""

from __future__ import annotations

import logging
import socket

from amqtt.broker import Broker

logger = logging.getLogger(__name__)

_CONNECT_311 = bytes([0x10, 0x17, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x05, 0x00, 0x0B]) + b"gw-probe-01"


def broker_answers(host: str, port: int, *, timeout: float = 1.0) -> bool:
    """Whether an MQTT broker answers a 3.1.1 CONNECT at ``host:port`` with a CONNACK."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_CONNECT_311)
            reply = sock.recv(4)
            with_disconnect = b"\xe0\x00"
            sock.sendall(with_disconnect)
    except OSError:
        return False
    return len(reply) >= 2 and reply[0] == 0x20


class EmbeddedBroker:
    def __init__(self, *, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    async def start(self) -> None:
        # amqtt binds the broker to the running loop when it is built, so it is built here.
        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await self._broker.start()
        logger.info("embedded MQTT broker listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
