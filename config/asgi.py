"""ASGI entry point: ``daphne config.asgi:application`` serves HTTP and the WebSocket protocol."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from gateway.routing import build_application  # noqa: E402  (Django must be set up first)

application = build_application(http_app=django_asgi_app)
