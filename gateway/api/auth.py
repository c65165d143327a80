"""How API requests authenticate (contract section 5): ``Authorization: Bearer <token>`` or the Django session.

A token needs no CSRF token (a browser never adds the header on its own); a session must pass Django's CSRF check
on unsafe methods. A token that is presented but invalid is refused even beside a valid session. Without either,
ninja answers 401 (``gateway.api.errors``).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from ninja.security import APIKeyCookie, HttpBearer

from devices import selectors, services
from gateway.api.errors import ApiError


def _protected(request: HttpRequest) -> HttpResponse:
    """Stands for the API's views in the CSRF check: a view that is not CSRF-exempt."""
    return HttpResponse()


# Django's CSRF check, run by hand for session-authenticated requests (it logs each refusal with its reason).
_csrf = CsrfViewMiddleware(_protected)


def bearer_token(request: HttpRequest) -> str | None:
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credential.strip()
    return None


class BearerToken(HttpBearer):
    """An API token (``manage.py issue_token``); its user becomes ``request.user``."""

    def __call__(self, request: HttpRequest) -> User | None:
        token = bearer_token(request)
        if token is None:
            return None
        return self.authenticate(request, token)

    def authenticate(self, request: HttpRequest, token: str) -> User:
        found = selectors.token_record(token=token) if token else None
        if found is None:
            raise ApiError(401, "unauthenticated", "invalid or revoked API token")
        services.touch_token(token_id=found.id)
        request.user = found.user
        return found.user


class SessionWithCsrf(APIKeyCookie):
    """The console's login session; unsafe methods must send the ``csrftoken`` cookie's value as X-CSRFToken."""

    param_name = settings.SESSION_COOKIE_NAME

    def __call__(self, request: HttpRequest) -> User | None:
        return self.authenticate(request, None)

    def authenticate(self, request: HttpRequest, key: str | None) -> User | None:
        user = request.user
        if isinstance(user, AnonymousUser) or not user.is_authenticated:
            return None
        if _csrf.process_view(request, _protected, (), {}) is not None:  # passes safe methods such as GET
            raise ApiError(403, "csrf_failed", "CSRF check failed: send the csrftoken cookie's value as X-CSRFToken")
        return user


def current_user(request: HttpRequest) -> User:
    """The user the API's auth let in."""
    user = request.user
    assert isinstance(user, User)
    return user
