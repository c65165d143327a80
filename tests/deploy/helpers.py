"""Helpers for the deploy/ tests: render the examples as install.sh and an operator would, a throwaway CA, and
the units' commands run under their system-call sandbox."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT, require

DEPLOY = ROOT / "deploy"
SANDBOX = Path(__file__).with_name("sandbox.py")
COMMON_DROPIN = "gateway-.service.d/10-gateway.conf"


def require_binary(name: str, package: str) -> str:
    """The path of a binary from a Debian package (in /usr/sbin too, which a non-root PATH may lack)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    require(name, path is not None, f"install Debian's {package} package")
    assert path is not None
    return path


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each literal of an example with the test's value; an example that lost a literal fails loudly."""
    for old, new in replacements.items():
        assert old in text, f"the example no longer contains {old!r}; update the test with it"
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Units:
    """The units as install.sh renders them, with the checkout as the installed code and its .venv."""

    directory: Path
    prefix: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    def sandbox_files(self, template: str) -> list[Path]:
        return [self.path(template), self.path(COMMON_DROPIN)]

    def command(self, template: str, instance: str, key: str = "ExecStart") -> list[str]:
        """One of the unit's commands (``ExecStart=``, ``ExecStartPost=``) as an argument list, ``%i`` filled in."""
        text = re.sub(r"\\\n\s*", " ", self.path(template).read_text())
        line = next(line for line in text.splitlines() if line.startswith(f"{key}="))
        return shlex.split(line.removeprefix(f"{key}=").replace("%i", instance))

    def sandboxed(self, template: str, instance: str, key: str = "ExecStart") -> list[str]:
        """That command run under the unit's system-call sandbox (tests/deploy/sandbox.py)."""
        files = [str(path) for path in self.sandbox_files(template)]
        return [sys.executable, str(SANDBOX), *files, "--", *self.command(template, instance, key)]


def render_units(directory: Path, *, user: str = "iot-gateway") -> Units:
    """Run ``install.sh --units-only`` into ``directory``: code = this checkout, virtualenv = its .venv."""
    prefix = directory / "prefix"
    prefix.mkdir(parents=True)
    (prefix / "app").symlink_to(ROOT)
    units = directory / "units"
    subprocess.run(
        [
            "bash",
            str(DEPLOY / "install.sh"),
            "--units-only",
            "--no-systemctl",
            "--prefix",
            str(prefix),
            "--venv",
            str(ROOT / ".venv"),
            "--confdir",
            str(directory / "etc"),
            "--unitdir",
            str(units),
            "--user",
            user,
        ],
        check=True,
        capture_output=True,
    )
    return Units(directory=units, prefix=prefix)


@dataclass(frozen=True)
class Tls:
    """A throwaway CA and a server certificate for localhost and 127.0.0.1, made with openssl."""

    ca: Path
    certificate: Path
    key: Path


def make_tls(directory: Path) -> Tls:
    openssl = require_binary("openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    certificate, key, request = directory / "server.crt", directory / "server.key", directory / "server.csr"
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    signed = ["-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2", "-extfile", extensions]
    commands = [
        [openssl, "req", "-x509", *ec, "-days", "2", "-subj", "/CN=deploy test CA", "-keyout", ca_key, "-out", ca],
        [openssl, "req", *ec, "-subj", "/CN=localhost", "-keyout", key, "-out", request],
        [openssl, "x509", "-req", "-in", request, *signed, "-out", certificate],
    ]
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return Tls(ca=ca, certificate=certificate, key=key)
