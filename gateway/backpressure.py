"""Backpressure from a WebSocket's TCP connection to its sender task.

Daphne hands every frame to Twisted, which buffers what the client has not read without a bound: a client that
stops reading would grow the process's memory however small its feed is. ``WriteGate`` is a streaming producer on
the socket's Twisted transport: Twisted pauses it when the transport's send buffer passes its ``bufferSize``
(64 KiB) and resumes it once the buffer is empty. The sender takes nothing from the feed while the gate is shut,
so events wait in the bounded feed (where overflow becomes a ``gap``), and a gate shut for too long closes the
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any


class WriteGate:
    """Open while the client reads what it is sent; shut while its transport's send buffer is full."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    @classmethod
    def for_send(cls, send: Any) -> WriteGate:
        """A gate on the transport behind Daphne's own ``send`` callable (``partial(server.handle_reply, protocol)``;
        other middleware wraps it, hence ``WriteGateMiddleware`` outermost). Under another server (or a test
        communicator) there is no transport to watch, and the gate stays open."""
        gate = cls()
        protocol = send.args[0] if isinstance(send, functools.partial) and send.args else None
        transport = getattr(protocol, "transport", None)
        if transport is not None and hasattr(transport, "registerProducer"):
            # Daphne upgrades an HTTP connection: the HTTP channel registered itself as the transport's producer
            # and, having handed the transport over, never unregisters. It no longer writes to it.
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
            transport.registerProducer(gate, True)
        return gate

    # --- Twisted's IPushProducer, called on the event loop (Daphne runs Twisted's asyncio reactor) -------------

    def pauseProducing(self) -> None:  # Twisted's interface
        self._open.clear()

    def resumeProducing(self) -> None:
        self._open.set()

    def stopProducing(self) -> None:  # the connection is gone: disconnect() cleans up
        self.resumeProducing()

    # --- the sender's side --------------------------------------------------------------------------------------

    async def wait_open(self, within: float) -> bool:
        """Wait until the client has read what it was sent; False if it has not within ``within`` seconds."""
        if self._open.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._open.wait(), within)
        return self._open.is_set()


class WriteGateMiddleware:
    """Outermost WebSocket middleware: puts the connection's ``WriteGate`` in the scope as ``write_gate``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return await self.inner({**scope, "write_gate": WriteGate.for_send(send)}, receive, send)
