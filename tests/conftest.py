from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that start real processes or browsers run last, so quick feedback comes first.
    items.sort(key=lambda item: 1 if item.get_closest_marker("slow") or item.get_closest_marker("browser") else 0)
