"""deploy/systemd: the units as install.sh renders them pass ``systemd-analyze verify`` without a warning, score
low on ``systemd-analyze security``, and their system-call sandbox is the one the other deploy tests run the
gateway's commands under."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from django.conf import settings

from tests.deploy.helpers import COMMON_DROPIN, SANDBOX, Units, require_binary

INSTANCES = ["gateway-web@8001.service", "gateway-bridge@9101.service", "gateway-bridge-retire@9101.service"]
MAX_EXPOSURE = 1.5  # systemd's scale: up to 1.9 is "OK"; the units measured 1.0 with systemd 252


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    command = [require_binary("systemd-analyze", "systemd"), *args]
    # No running systemd is needed: verify and --offline security read the files given, plus the host's unit
    # directories for what they depend on. Log at "notice" so every warning shows, and no colour codes.
    env = {"SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def verify(units: Units, names: list[str]) -> list[str]:
    """What ``systemd-analyze verify`` says about our units (lines about the host's own units are not ours)."""
    result = analyze("verify", "--man=no", *[str(units.path(name)) for name in names])
    lines = (result.stdout + result.stderr).splitlines()
    ours = [line for line in lines if "gateway" in line or str(units.directory) in line]
    if result.returncode != 0:
        ours.append(f"exit status {result.returncode}")
    return ours


def test_units_verify_without_a_warning(units):
    assert verify(units, [*INSTANCES, "gateway.target"]) == []


def test_verify_would_report_a_broken_unit(units, tmp_path):
    broken = tmp_path / "units"
    shutil.copytree(units.directory, broken)
    unit = broken / "gateway-bridge@.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=30s", "WatchdogSec=30s\nWatchdogSeconds=30"))
    complaints = verify(Units(directory=broken, prefix=units.prefix), ["gateway-bridge@9101.service"])
    assert any("WatchdogSeconds" in line for line in complaints), complaints


def test_units_expose_little(units, capsys):
    scores = {}
    for name in INSTANCES:
        result = analyze("security", "--offline=true", "--no-pager", str(units.path(name)))
        match = re.search(r"Overall exposure level for (\S+): ([0-9.]+) (\w+)", result.stdout)
        assert match, result.stdout + result.stderr
        scores[match[1]] = float(match[2])
        with capsys.disabled():
            print(f"\nsystemd-analyze security {match[1]}: {match[2]} {match[3]}")
    assert all(score <= MAX_EXPOSURE for score in scores.values()), scores


def test_the_web_units_daphne_limits_are_four_times_the_frame_limit(units):
    command = units.command("gateway-web@.service", "8001")
    limit = str(4 * settings.GATEWAY["WS_MAX_FRAME"])
    for flag in ("--websocket-max-message-size", "--websocket-max-frame-size"):
        assert command[command.index(flag) + 1] == limit, command


SANDBOX_PROBE = """
import mmap, os, socket
def refused(call):
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None
print(refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)))
print(refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)))
print(refused(lambda: os.setuid(os.getuid())))
print(refused(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()))
"""


def test_the_sandbox_the_other_tests_use_is_the_units_own(units):
    """sandbox.py applies the drop-in's filters for real: writable+executable memory, other address families and
    privileged calls are refused, ordinary sockets are not. So a command that works under it tolerates them."""
    require_binary("systemd-analyze", "systemd")
    files = [str(path) for path in units.sandbox_files("gateway-bridge@.service")]
    result = subprocess.run(
        [sys.executable, str(SANDBOX), *files, "--", sys.executable, "-c", SANDBOX_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    # EPERM (1): MemoryDenyWriteExecute and SystemCallErrorNumber; EAFNOSUPPORT (97): RestrictAddressFamilies.
    assert result.stdout.split() == ["1", "97", "1", "None"], result.stdout + result.stderr
    dropin = units.path(COMMON_DROPIN).read_text()
    assert "MemoryDenyWriteExecute=yes" in dropin and "SystemCallFilter=@system-service" in dropin


@pytest.mark.parametrize("name", ["gateway-web@.service", "gateway-bridge@.service"])
def test_instances_belong_to_the_target(units, name):
    text = units.path(name).read_text()
    assert "PartOf=gateway.target" in text and "WantedBy=gateway.target" in text


def test_the_retire_unit_resumes_the_bridges_own_session(units):
    def client_id(name: str) -> str:
        found = re.search(r"GATEWAY_MQTT_CLIENT_ID=(\S+)", units.path(name).read_text())
        assert found, name
        return found[1]

    assert client_id("gateway-bridge-retire@.service") == client_id("gateway-bridge@.service") == "gateway-bridge-%H-%i"
