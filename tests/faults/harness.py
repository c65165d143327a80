"""Reusable pieces for tests that run real processes and break them: databases, services of the test's own (so they
can be killed and restarted without touching the machine's), and readers of what a user sees (/metrics, RSS).

Not a test module: test modules import from here (and from ``tests.support``), never from each other.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from tests.support import ROOT, GatewayProcess, free_port, gateway_env, manage, require_postgres, wait_for

# --- databases ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "gateway_topology") -> Iterator[str]:
    """A new PostgreSQL database on ``server_url``, migrated; its DATABASE_URL. Dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, dbname="postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = urlsplit(server_url)._replace(path=f"/{name}").geturl()
    try:
        run_manage(url, "migrate", "--noinput", "-v", "0")
        yield url
    finally:
        with psycopg.connect(server_url, dbname="postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A fresh, migrated database on the machine's PostgreSQL (whatever the suite's own database is)."""
    with fresh_database(require_postgres()) as url:
        yield url


def run_manage(database_url: str, *args: str) -> str:
    done = subprocess.run(
        manage(*args), cwd=ROOT, env=gateway_env(DATABASE_URL=database_url), capture_output=True, timeout=120
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)} failed:\n{done.stdout.decode()}{done.stderr.decode()}"
    return done.stdout.decode()


def operator_token(database_url: str, username: str = "topology") -> str:
    run_manage(database_url, "create_operator", "--username", username)
    return run_manage(database_url, "issue_token", username).strip().splitlines()[-1]


def stored_event_ids(database_url: str) -> set[int]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM devices_event")}


# --- what a user sees ---------------------------------------------------------------------------------------------


def bridge_metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of a process's Prometheus metrics (a bridge's GATEWAY_METRICS_BIND, or a Daphne's /metrics);
    None when not served (yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    return None


def rss_mb(process: GatewayProcess) -> float:
    """The resident set size of a gateway process, in MiB."""
    assert process.process is not None
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {process.name}")


# --- services of the test's own -----------------------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """A redis-server of the test's own on a free port, without persistence, so a restart empties it."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, timeout=10, what=f"redis-server on {self.port}")
        return self

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """Stop it the hard way (a crash: clients see their connections reset)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (trust auth, user postgres, no fsync) that a test can stop and start.

    ``initdb`` costs a few seconds: create one per module or session and ``stop``/``start`` it in the cases.
    Its files live in a temporary directory owned by the postgres user; ``remove`` stops it and deletes them.
    """

    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gateway-pg-")))

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, timeout=timeout)
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout.decode()}{done.stderr.decode()}"

    def init(self) -> PrivatePostgres:
        shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        return self

    def start(self) -> None:
        log = self.directory / "server.log"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-t", "30", "start")
        wait_for(self.answers, timeout=15, what=f"PostgreSQL on {self.port}")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash as clients see it: every connection dropped, no checkpoint."""
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def answers(self) -> bool:
        try:
            psycopg.connect(self.url, connect_timeout=1).close()
            return True
        except psycopg.Error:
            return False

    def remove(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def seconds_since(moment: float) -> float:
    return time.monotonic() - moment
