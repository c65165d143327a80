"""deploy/gateway.env.example and deploy/credentials.example against docs/protocol.md section 11: every setting is
there once, with its documented default when commented out, and no secret is in the environment file."""

from __future__ import annotations

import re

from config.env import read_dotenv
from tests.deploy.helpers import COMMON_DROPIN, DEPLOY
from tests.support import ROOT

EXAMPLE = DEPLOY / "gateway.env.example"
SECRETS = {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "MQTT_URL"}
SET_BY_THE_UNITS = {"GATEWAY_ENV_FILE", "GATEWAY_MQTT_CLIENT_ID", "GATEWAY_METRICS_BIND"}
SET_BY_THE_INSTALL = {"DJANGO_STATIC_ROOT"}


def documented_defaults() -> dict[str, str]:
    """``VARIABLE -> first backticked word of its default`` from the configuration table in protocol.md."""
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    section = protocol[protocol.index("## 11. Configuration") : protocol.index("## 12.")]
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| ([^|]*)\|", section, flags=re.MULTILINE)
    return {name: (re.findall(r"`([^`]*)`", default) or [""])[0] for name, default in rows}


def example_lines() -> dict[str, str]:
    """Every ``KEY=value`` line of the example, set or commented out."""
    lines = re.findall(r"^#?([A-Z][A-Z0-9_]+)=(.*)$", EXAMPLE.read_text(), flags=re.MULTILINE)
    assert len(lines) == len(dict(lines)), "a variable appears twice"
    return dict(lines)


def test_every_documented_setting_is_in_the_example_and_nothing_else():
    documented = set(documented_defaults())
    assert set(example_lines()) == documented - SECRETS - SET_BY_THE_UNITS - SET_BY_THE_INSTALL
    text = EXAMPLE.read_text()
    assert all(name in text for name in SECRETS | SET_BY_THE_UNITS | SET_BY_THE_INSTALL), "each one explained"


def test_commented_out_lines_show_the_documented_default():
    defaults = documented_defaults()
    commented = re.findall(r"^#([A-Z][A-Z0-9_]+)=(.*)$", EXAMPLE.read_text(), flags=re.MULTILINE)
    assert {name: value for name, value in commented if value != defaults[name]} == {}


def test_the_example_parses_and_sets_no_secret():
    values = read_dotenv(EXAMPLE)
    assert not set(values) & (SECRETS | SET_BY_THE_UNITS)
    assert values["DJANGO_HTTPS"] == "1" and values["GATEWAY_MQTT_SHARED_GROUP"] == "gateway"


def listed(text: str, pattern: str) -> set[str]:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, pattern
    return set(match[1].split())


def test_the_units_install_and_credentials_example_name_the_same_secrets():
    dropin = (DEPLOY / "systemd" / COMMON_DROPIN).read_text()
    assert set(re.findall(r"^LoadCredential=([A-Z_]+):", dropin, flags=re.MULTILINE)) == SECRETS
    assert listed((DEPLOY / "install.sh").read_text(), r"^SECRETS=\((.*)\)$") == SECRETS
    generated = {"DJANGO_SECRET_KEY"}
    assert listed((DEPLOY / "credentials.example").read_text(), r"^for name in (.*); do$") | generated == SECRETS
