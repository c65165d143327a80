"""Production settings pass ``manage.py check --deploy`` with no warning; development settings do not."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import gateway_env, manage

pytestmark = [pytest.mark.slow]

PRODUCTION = {
    "DJANGO_SECRET_KEY": "k3Q9-zV1r_0bN7xT2wLh8pYc5sUe4fJa6dMg1oRi3vKq9nXt7yBz2uWc5eHj8lPs",
    "DJANGO_HTTPS": "1",
    "DJANGO_ALLOWED_HOSTS": "gateway.example.com",
    "DJANGO_DEBUG": "0",
}


def check_deploy(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        manage("check", "--deploy", "--fail-level", "WARNING"),
        env=gateway_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_settings_pass_check_deploy():
    result = check_deploy(**PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_hsts_preload_is_opt_in_and_then_sent():
    result = check_deploy(**PRODUCTION, DJANGO_HSTS_PRELOAD="1")
    assert result.returncode == 0, result.stderr


def test_plain_http_development_settings_are_flagged():
    result = check_deploy(DJANGO_DEBUG="1")
    assert result.returncode != 0
    for code in ("security.W004", "security.W008", "security.W012", "security.W016", "security.W018"):
        assert code in result.stderr, result.stderr
