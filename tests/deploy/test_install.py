"""deploy/install.sh into a temporary prefix, without systemctl and without pip (this checkout's .venv already has
the dependencies; a real pip install takes minutes): it stops at missing credentials, then installs code, static
files, configuration, units and the database, and a second run changes nothing."""

from __future__ import annotations

import re
import sqlite3
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY
from tests.support import ROOT

pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Install:
    root: Path
    revision: str

    @property
    def prefix(self) -> Path:
        return self.root / "opt"

    @property
    def confdir(self) -> Path:
        return self.root / "etc"

    @property
    def units(self) -> Path:
        return self.root / "units"

    def run(self) -> subprocess.CompletedProcess[str]:
        options = {
            "--prefix": self.prefix,
            "--confdir": self.confdir,
            "--unitdir": self.units,
            "--ref": self.revision,
            "--venv": ROOT / ".venv",
            "--user": subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
        }
        arguments = [str(part) for option in options.items() for part in option]
        command = ["bash", str(DEPLOY / "install.sh"), *arguments, "--no-pip", "--no-systemctl"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def secret(self, name: str) -> Path:
        return self.confdir / "credentials" / name

    def manage(self, *args: str) -> subprocess.CompletedProcess[str]:
        """manage.py of the installed code with the installed configuration only (as a unit sees it)."""
        env = {
            "PATH": "/usr/bin:/bin",
            "GATEWAY_ENV_FILE": str(self.confdir / "gateway.env"),
            "CREDENTIALS_DIRECTORY": str(self.confdir / "credentials"),
        }
        command = [str(ROOT / ".venv/bin/python"), str(self.prefix / "app/manage.py"), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass(frozen=True)
class FirstInstall:
    install: Install
    without_credentials: subprocess.CompletedProcess[str]
    secret_key_mode: int
    with_credentials: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> FirstInstall:
    """A first install without credentials (it must stop), then with them."""
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    install = Install(root=tmp_path_factory.mktemp("install"), revision=revision.stdout.strip())
    without = install.run()
    secret_key_mode = mode(install.secret("DJANGO_SECRET_KEY"))
    install.secret("DATABASE_URL").write_text(f"sqlite:///{install.root}/db.sqlite3\n")
    install.secret("REDIS_URL").write_text("redis://127.0.0.1:6379/11")  # not contacted by the install
    install.secret("MQTT_URL").write_text("mqtt://gateway-bridge:secret@127.0.0.1:1883")
    return FirstInstall(install, without, secret_key_mode, install.run())


def test_a_first_install_stops_at_the_missing_credentials(first):
    install, result = first.install, first.without_credentials
    assert result.returncode == 1
    assert "missing credentials" in result.stderr and "DATABASE_URL REDIS_URL MQTT_URL" in result.stderr
    assert len(install.secret("DJANGO_SECRET_KEY").read_text()) >= 50, "generated"
    assert first.secret_key_mode == 0o400
    assert mode(install.confdir / "credentials") == 0o700
    assert mode(install.confdir / "gateway.env") == 0o640
    assert (install.confdir / "gateway.env").read_text() == (
        install.prefix / "app/deploy/gateway.env.example"
    ).read_text()


def test_with_the_credentials_it_installs_everything(first):
    install, result = first.install, first.with_credentials
    assert result.returncode == 0, result.stdout + result.stderr
    assert (install.prefix / "app/REVISION").read_text().strip() == install.revision
    assert (install.prefix / "static/gateway/console.css").is_file()
    assert (install.prefix / "static/gateway/vendor/uplot/uPlot.esm.js").is_file()  # fetched, hash-checked
    assert (install.prefix / "static/admin/css/base.css").is_file()
    assert mode(install.secret("MQTT_URL")) == 0o400, "tightened"
    with sqlite3.connect(install.root / "db.sqlite3") as db:
        applied = {app for (app,) in db.execute("SELECT app FROM django_migrations")}
    assert {"devices", "auth", "sessions"} <= applied
    rendered = [
        *install.units.rglob("*.service"),
        *install.units.rglob("*.conf"),
        install.prefix / "bin/gateway-manage",
    ]
    assert len(rendered) == 5
    for path in rendered:
        assert re.search(r"@[A-Z_]+@", path.read_text()) is None, path
    assert (
        f"WorkingDirectory={install.prefix}/app\n" in (install.units / "gateway-.service.d/10-gateway.conf").read_text()
    )
    assert mode(install.prefix / "bin/gateway-manage") == 0o755


def test_the_installed_configuration_passes_djangos_deployment_checks(first):
    result = first.install.manage("check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_second_run_changes_nothing(first):
    install = first.install
    env_file = install.confdir / "gateway.env"
    env_file.write_text(env_file.read_text() + "GATEWAY_LOG_LEVEL=WARNING\n")
    before = {path: path.stat().st_mtime_ns for path in install.root.rglob("*") if path.is_file()}
    key = install.secret("DJANGO_SECRET_KEY").read_text()
    result = install.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already installed" in result.stdout
    assert "No migrations to apply" in result.stdout
    assert install.secret("DJANGO_SECRET_KEY").read_text() == key
    assert env_file.read_text().endswith("GATEWAY_LOG_LEVEL=WARNING\n")
    kept = [path for path in before if not path.name.startswith("db.sqlite3")]
    assert [path for path in kept if path.stat().st_mtime_ns != before[path]] == []
