from __future__ import annotations

import pytest
from channels.layers import InMemoryChannelLayer, channel_layers

from tests.gateway.browser import browser, gateway, operator  # noqa: F401  (fixtures of the browser tests)


@pytest.fixture
def layer():
    """A fresh in-memory layer as the default one (each test has its own event loop)."""
    fresh = InMemoryChannelLayer(capacity=1000)
    old = channel_layers.set("default", fresh)
    yield fresh
    if old is not None:
        channel_layers.set("default", old)
    else:
        channel_layers.backends.pop("default", None)
