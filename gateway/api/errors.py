"""Every error the API answers is ``{"error": code, "message": ...}`` (contract section 5); this module turns what
the views, the framework and the devices app raise into that shape."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.cache import never_cache
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from devices.services import DATABASE_UNAVAILABLE, AccessRefused, CommandRefused

ERROR_STATUS = {"unknown_device": 404, "unknown_command": 404, "forbidden": 403}


class ApiError(Exception):
    """Raised by views and auth: answered as ``status`` with ``{"error": code, "message": message}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class BodyError(ValueError):
    """A request body that is not a JSON object (ninja answers it as a 400 caused by this)."""


def error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": code, "message": message}, status=status)


def refused(exc: AccessRefused | CommandRefused) -> ApiError:
    """A refusal from the devices app, with its status: 404 unknown, 403 forbidden, 400 anything else."""
    return ApiError(ERROR_STATUS.get(exc.code, 400), exc.code, str(exc))


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """``query parameter limit: Input should be ... (got '0')``, for each error ninja collected."""
    parts = []
    for item in errors:
        source, *names = [str(part) for part in item.get("loc", ())]
        where = f"{source} parameter" if source in {"query", "path"} else source
        names = [name for name in names if name != source]  # ninja repeats "body" for a whole-body model
        name = ".".join(names)
        got = f" (got {str(item['input'])[:100]!r})" if "input" in item else ""
        parts.append(f"{where} {name}: {item.get('msg', 'invalid')}{got}".replace("  ", " "))
    return "; ".join(parts)


def answer(request: HttpRequest, exc: object) -> HttpResponse:
    """The API's answer to an exception raised by a view, by auth, or by ninja itself."""
    if isinstance(exc, AccessRefused | CommandRefused):
        exc = refused(exc)
    if isinstance(exc, ApiError):
        return error(exc.status, exc.code, exc.message)
    if isinstance(exc, DATABASE_UNAVAILABLE):
        return error(503, "unavailable", "the database is unavailable; try again later (a command: same request_id)")
    if isinstance(exc, ValidationError):
        return error(400, "bad_request", describe_validation(exc.errors))
    if isinstance(exc, AuthenticationError):
        return error(401, "unauthenticated", "log in or send Authorization: Bearer <token>")
    if isinstance(exc, HttpError):
        if isinstance(exc.__cause__, BodyError):
            return error(400, "bad_request", str(exc.__cause__))
        return error(exc.status_code, "bad_request" if exc.status_code == 400 else "error", exc.message)
    raise TypeError(f"no API answer for {type(exc).__name__}")


HANDLED = (
    ApiError,
    AccessRefused,
    CommandRefused,
    ValidationError,
    AuthenticationError,
    HttpError,
    *DATABASE_UNAVAILABLE,
)


def install_handlers(api: NinjaAPI) -> None:
    """Answer these exceptions in the API's shape (anything else stays a server error)."""
    for exc_class in HANDLED:
        api.add_exception_handler(exc_class, answer)


View = Callable[..., HttpResponseBase]


def json_errors(view: View) -> View:
    """Wrap one of ninja's URL views: never cached, and a wrong method gets a JSON 405 with ``Allow``."""

    @never_cache
    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        response = view(request, *args, **kwargs)
        if response.status_code != 405:
            return response
        allowed = sorted(method.strip() for method in response.get("Allow", "").split(","))  # ninja's set order
        answer = error(405, "method_not_allowed", f"use {' or '.join(allowed)}")
        answer["Allow"] = ", ".join(allowed)
        return answer

    return wrapped
