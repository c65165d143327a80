"""The HTTP API under ``/api/`` (contract section 5), built with django-ninja: typed operations, validation, and an
OpenAPI 3.1 schema generated from the same types at ``/api/openapi.json`` (interactive docs at ``/api/docs``)."""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpRequest
from django.urls import URLPattern, URLResolver
from django.utils.datastructures import MultiValueDict
from ninja import NinjaAPI
from ninja.errors import ValidationError, ValidationErrorContext
from ninja.openapi.schema import OpenAPISchema
from ninja.parser import Parser

from gateway.api import commands, devices
from gateway.api.auth import BearerToken, SessionWithCsrf
from gateway.api.errors import BodyError, install_handlers, json_errors

API_NAMESPACE = "api"


class GatewayParser(Parser):
    """Request bodies are parsed by orjson, as everywhere in the gateway (NaN and Infinity are refused, nesting is
    capped, invalid UTF-8 is an error), and must be JSON objects (``null`` stands for no body)."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any] | None:  # type: ignore[override]
        try:
            data = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise BodyError(f"body is not valid JSON: {exc}") from exc
        if data is not None and not isinstance(data, dict):
            raise BodyError(f"body must be a JSON object, got {type(data).__name__}")
        return data

    def parse_querydict(
        self, data: MultiValueDict[str, Any], list_fields: list[str], request: HttpRequest
    ) -> dict[str, Any]:
        """Ninja's, except that a parameter that takes one value may not be given several times."""
        repeated = [
            {"loc": ("query", key), "msg": f"given {len(data.getlist(key))} times, expected once", "type": "repeated"}
            for key in data
            if key not in list_fields and len(data.getlist(key)) > 1
        ]
        if repeated:
            raise ValidationError(repeated)
        return super().parse_querydict(data, list_fields, request)


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

    def get_openapi_schema(
        self, *, path_prefix: str | None = None, path_params: dict[str, Any] | None = None
    ) -> OpenAPISchema:
        """Ninja's schema, except that optional parameters are not also documented as ``null``: a query string
        cannot carry a null, leaving the parameter out is how to say "none"."""
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        for operations in schema["paths"].values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    parameter["schema"] = _without_null(parameter["schema"])
        return schema


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    options = [option for option in schema.get("anyOf", []) if option != {"type": "null"}]
    if len(options) != 1:
        return schema
    return {**{key: value for key, value in schema.items() if key != "anyOf"}, **options[0]}


api = GatewayApi(
    title="IoT gateway API",
    version="1",
    description="Devices, their history and commands. Authenticate with `Authorization: Bearer <token>` "
    "(`manage.py issue_token`) or the console's session (unsafe methods then need the X-CSRFToken header).",
    urls_namespace=API_NAMESPACE,
    auth=[BearerToken(), SessionWithCsrf()],
    parser=GatewayParser(),
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
