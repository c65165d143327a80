"""WebSocket authentication: API tokens (``?token=`` or ``Authorization: Bearer``) beside Django sessions."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.middleware import BaseMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.request import validate_host

from devices import selectors, services
from gateway.db import db_call

SESSION = "session"
TOKEN = "token"


def token_from_scope(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credential = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return str(credential.strip())
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    tokens = query.get("token")
    return tokens[-1] if tokens else None


@db_call
def _token_owner(token: str) -> tuple[Any, int | None]:
    found = selectors.token_record(token=token)
    if found is None:
        return AnonymousUser(), None
    services.touch_token(token_id=found.id)
    return found.user, found.id


class TokenAuthMiddleware(BaseMiddleware):
    """Put the token's user in ``scope["user"]`` when a token is given; sessions are left to AuthMiddleware."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        token = token_from_scope(scope)
        scope = dict(scope)
        if token is not None:
            scope["user"], scope["token_id"] = await _token_owner(token)
            scope["auth_method"] = TOKEN
        else:
            scope["auth_method"] = SESSION
        return await super().__call__(scope, receive, send)


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether the socket's Origin header names a host in ALLOWED_HOSTS (a missing Origin is not allowed)."""
    for name, value in scope.get("headers", []):
        if name == b"origin":
            host = urlsplit(value.decode("latin-1")).hostname
            return bool(host) and validate_host(host, list(settings.ALLOWED_HOSTS))
    return False
