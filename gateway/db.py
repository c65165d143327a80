"""The one way web-side async code reaches the ORM: Channels' database_sync_to_async, with its types kept."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar, cast

from channels.db import database_sync_to_async

P = ParamSpec("P")
R = TypeVar("R")


def db_call(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """Run ``func`` in the sync thread, closing connections the database dropped first (like channels does)."""
    return cast("Callable[P, Awaitable[R]]", database_sync_to_async(func))
