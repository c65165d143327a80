from __future__ import annotations

import uuid

import pytest

from tests.support import PrivateMosquitto, free_port, require_mosquitto_binary


@pytest.fixture
def private_mosquitto(tmp_path):
    require_mosquitto_binary()
    broker = PrivateMosquitto(port=free_port(), directory=tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of the test's own, so tests on the shared broker never see each other's devices."""
    return f"t{uuid.uuid4().hex[:10]}/devices"
