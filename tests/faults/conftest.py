"""The reliability matrix (issue 8): real processes broken on purpose, each case bounded in time.

Every test here is marked ``faults`` (and ``slow``): ``pytest -m faults`` runs the suite alone. The cases start
their own gateway processes on their own PostgreSQL database, so they do not depend on the pass's database: when
``scripts/test`` runs two passes it sets ``GATEWAY_TEST_FAULTS=skip`` for the SQLite one, and the suite runs once,
in the PostgreSQL pass (production's database).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import fresh_postgres_database

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = os.environ.get("GATEWAY_TEST_FAULTS", "").lower() == "skip"
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.faults)
        item.add_marker(pytest.mark.slow)
        if skip:
            item.add_marker(pytest.mark.skip(reason="the fault suite runs once, in the PostgreSQL pass"))


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database of the case's own (whatever the suite's database is); its DATABASE_URL."""
    with fresh_postgres_database() as url:
        yield url
