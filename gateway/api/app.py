"""The HTTP API under ``/api/`` (contract section 5), built with django-ninja: typed operations, validation, and an
OpenAPI 3.1 schema generated from the same types at ``/api/openapi.json`` (interactive docs at ``/api/docs``)."""

from __future__ import annotations

from typing import Any, cast

import orjson
from django.http import HttpRequest
from django.urls import URLPattern, URLResolver
from ninja import NinjaAPI
from ninja.errors import ValidationError, ValidationErrorContext
from ninja.parser import Parser

from gateway.api import commands, devices
from gateway.api.auth import BearerToken, SessionWithCsrf
from gateway.api.errors import install_handlers, json_errors

API_NAMESPACE = "api"


class OrjsonParser(Parser):
    """Request bodies are parsed by orjson, as everywhere in the gateway: NaN and Infinity are refused, nesting
    is capped, and invalid UTF-8 is an error rather than replaced."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        return cast("dict[str, Any]", orjson.loads(request.body))


class GatewayApi(NinjaAPI):
    """Ninja's API, except that validation errors keep the offending value (when there is one), so a 400 can
    name it."""

    def validation_error_from_error_contexts(
        self, error_contexts: list[ValidationErrorContext[Any]]
    ) -> ValidationError:
        errors: list[dict[str, Any]] = []
        for context in error_contexts:
            source = context.model.__ninja_param_source__
            for item in context.pydantic_validation_error.errors(include_url=False, include_context=False):
                found = {"loc": (source, *item["loc"]), "msg": item["msg"], "type": item["type"]}
                if item["type"] != "missing":
                    found["input"] = item.get("input")
                errors.append(found)
        return ValidationError(errors)


api = GatewayApi(
    title="IoT gateway API",
    version="1",
    description="Devices, their history and commands. Authenticate with `Authorization: Bearer <token>` "
    "(`manage.py issue_token`) or the console's session (unsafe methods then need the X-CSRFToken header).",
    urls_namespace=API_NAMESPACE,
    auth=[BearerToken(), SessionWithCsrf()],
    parser=OrjsonParser(),
)
install_handlers(api)
api.add_router("", devices.router)
api.add_router("", commands.router)


def urlpatterns() -> list[URLPattern | URLResolver]:
    """Ninja's URL patterns, each view wrapped by ``json_errors`` (never cached, JSON 405)."""
    patterns, _app, _namespace = api.urls
    wrapped: list[URLPattern | URLResolver] = []
    for pattern in patterns:
        if isinstance(pattern, URLPattern):
            pattern = URLPattern(pattern.pattern, json_errors(pattern.callback), pattern.default_args, pattern.name)
        wrapped.append(pattern)
    return wrapped
