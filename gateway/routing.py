"""The ASGI application: Django for HTTP, the events consumer at /ws/."""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from django.urls import path

from gateway.auth import TokenAuthMiddleware
from gateway.backpressure import WriteGateMiddleware
from gateway.consumers import EventsConsumer

websocket_urlpatterns = [path("ws/", EventsConsumer.as_asgi())]


def build_application(*, http_app: Any) -> ProtocolTypeRouter:
    return ProtocolTypeRouter(
        {
            "http": http_app,
            "websocket": WriteGateMiddleware(
                AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
            ),
        }
    )
