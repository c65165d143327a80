from __future__ import annotations

import pytest

from tests.deploy.helpers import Tls, Units, make_tls, render_units


@pytest.fixture(scope="session")
def units(tmp_path_factory: pytest.TempPathFactory) -> Units:
    """The systemd units as install.sh renders them, pointing at this checkout and its .venv."""
    return render_units(tmp_path_factory.mktemp("units"))


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))
