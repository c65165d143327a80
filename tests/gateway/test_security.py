"""HTTP security headers: the console's Content-Security-Policy (``gateway.security``) and Django's own headers as
``config/settings.py`` configures them, plain and behind HTTPS; and ``check --deploy`` on an HTTPS configuration."""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Awaitable
from html.parser import HTMLParser
from pathlib import Path
from typing import cast

import pytest
from django.contrib.auth import get_user_model
from django.http import HttpResponse
from django.test import RequestFactory

from devices import services
from devices.models import Device
from devices.records import EventKind, Observation
from gateway.security import SecurityHeadersMiddleware
from tests.support import ROOT, gateway_env, manage

pytestmark = pytest.mark.django_db

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
TEMPLATES = ROOT / "gateway" / "templates"
XSS = "<img src=x onerror=alert(1)><script>alert(2)</script><b style=color:red>x</b>"


@pytest.fixture
def operator(client):
    user = get_user_model().objects.create_superuser(username="op", password="pw")
    client.force_login(user)
    return user


@pytest.fixture
def device():
    """A device whose strings are markup, so the rendered pages show how they carry hostile text."""
    observations = [
        Observation(device_id="dev-1", kind=EventKind.TELEMETRY, received_at=0.0, body={"values": {"label": XSS}}),
        Observation(
            device_id="dev-1",
            kind=EventKind.EVENT,
            received_at=0.0,
            body={"name": XSS, "severity": "critical", "message": XSS},
        ),
    ]
    services.ingest(observations=observations, auto_register=True, max_devices=10)
    Device.objects.filter(id="dev-1").update(name=XSS)
    return "dev-1"


def assert_security_headers(response) -> None:
    assert response["Content-Security-Policy"] == CSP
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"


# --- Headers on every kind of response --------------------------------------------------------------------------


def test_the_policy_is_the_documented_one():
    from gateway.security import CONTENT_SECURITY_POLICY

    assert CONTENT_SECURITY_POLICY == CSP


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/login/", 200),
        ("/", 302),  # not logged in: the redirect carries them too
        ("/healthz", 200),
        ("/readyz", 503),  # an async view; no bridge in this test
        ("/metrics", 200),
        ("/api/devices/dev-1/commands", 401),
        ("/nope", 404),
    ],
)
def test_anonymous_responses_carry_the_headers(client, url, status):
    response = client.get(url)
    assert response.status_code == status
    assert_security_headers(response)


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/", 200),
        ("/devices/dev-1/", 200),
        ("/devices/ghost/", 404),
        ("/console/state.json", 200),
        ("/api/devices/dev-1/commands", 200),
        ("/admin/", 200),
        ("/admin/devices/device/", 200),
        ("/admin/devices/device/dev-1/change/", 200),
    ],
)
def test_console_pages_carry_the_headers(client, operator, device, url, status):
    response = client.get(url)
    assert response.status_code == status
    assert_security_headers(response)


def test_a_response_with_its_own_policy_keeps_it():
    own = "default-src 'none'"

    def view(request):
        response = HttpResponse("x")
        response["Content-Security-Policy"] = own
        return response

    response = cast(HttpResponse, SecurityHeadersMiddleware(view)(RequestFactory().get("/")))
    assert response["Content-Security-Policy"] == own


async def test_the_middleware_works_on_async_views():
    """The console has async views (/readyz): the middleware must not force them through a thread."""

    async def view(request):
        return HttpResponse("x")

    middleware = SecurityHeadersMiddleware(view)
    response = await cast(Awaitable[HttpResponse], middleware(RequestFactory().get("/")))
    assert response["Content-Security-Policy"] == CSP


# --- The console keeps working under the policy ---------------------------------------------------------------


class InlineCode(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block: inline scripts, style elements and attributes,
    event-handler attributes and javascript: URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._script: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        for name, value in attrs:
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}=...>")
            if name == "style":
                self.found.append(f"<{tag} style=...>")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().lower().startswith(
                "javascript:"
            ):
                self.found.append(f"<{tag} {name}=javascript:...>")
        if tag == "style":
            self.found.append("<style>")
        if tag == "script":
            # A script with src is loaded from 'self'; a JSON data block (json_script) is never executed.
            kind = (names.get("type") or "").lower()
            self._script = None if "src" in names or kind == "application/json" else tag

    def handle_data(self, data: str) -> None:
        if self._script is not None and data.strip():
            self.found.append(f"inline <script>: {data.strip()[:80]}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None


def inline_code(html: str) -> list[str]:
    parser = InlineCode()
    parser.feed(html)
    return parser.found


@pytest.mark.parametrize("path", sorted(TEMPLATES.rglob("*.html")), ids=lambda p: str(p.relative_to(TEMPLATES)))
def test_templates_have_no_inline_script_style_or_handler(path: Path):
    source = path.read_text()
    assert inline_code(source) == []
    # Template tags inside tags escape the parser above; a plain search catches what it could miss.
    assert not re.search(r"\son[a-z]+\s*=", source, re.IGNORECASE), "an inline event handler"
    assert not re.search(r"\sstyle\s*=", source, re.IGNORECASE), "an inline style attribute"


@pytest.mark.parametrize("url", ["/", "/devices/dev-1/", "/login/"])
def test_rendered_console_pages_have_no_inline_code(client, operator, device, url):
    """Rendered, with a device whose strings are markup: nothing on the page would need 'unsafe-inline'."""
    if url == "/login/":
        client.logout()
    response = client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    assert inline_code(html) == []
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert all('type="module"' in tag or 'type="application/json"' in tag for tag in scripts), scripts


# --- HTTPS (DJANGO_HTTPS=1 sets these; the test sets them directly) --------------------------------------------


@pytest.fixture
def https(settings):
    settings.SECURE_HSTS_SECONDS = 31_536_000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True


def test_behind_a_tls_proxy_responses_carry_hsts(https, client):
    response = client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 200
    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    assert_security_headers(response)
    assert response.cookies["csrftoken"]["secure"] is True


def test_behind_a_tls_proxy_the_session_cookie_is_secure(https, client):
    get_user_model().objects.create_user(username="op", password="pw")
    client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    response = client.post("/login/", {"username": "op", "password": "pw"}, HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 302
    cookie = response.cookies["sessionid"]
    assert cookie["secure"] is True and cookie["httponly"] is True and cookie["samesite"] == "Lax"


def test_plain_http_is_redirected_to_https_except_probes(https, client):
    response = client.get("/login/")
    assert response.status_code == 301 and response["Location"] == "https://testserver/login/"
    assert "Strict-Transport-Security" not in response  # only ever sent over HTTPS
    for probe in ("/healthz", "/metrics"):
        plain = client.get(probe)
        assert plain.status_code == 200, probe  # SECURE_REDIRECT_EXEMPT: probes and scrapers speak plain HTTP
        assert "Strict-Transport-Security" not in plain


def test_without_https_there_is_no_hsts(client):
    response = client.get("/login/")
    assert response.status_code == 200
    assert "Strict-Transport-Security" not in response
    assert_security_headers(response)


# --- check --deploy ------------------------------------------------------------------------------------------

# Warnings a production (HTTPS) configuration is allowed to report, each with the reason.
JUSTIFIED = {
    # SECURE_HSTS_PRELOAD: submitting a domain to the browsers' preload list is a commitment for the whole domain
    # (every subdomain HTTPS-only, hard to undo), so it is the deployer's decision, not a default of this project.
    "security.W021",
}


def test_check_deploy_is_clean_on_an_https_configuration():
    env = gateway_env(
        DJANGO_HTTPS="1",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),  # 67 characters, random: what security.W009 wants
        DJANGO_ALLOWED_HOSTS="gateway.example.com",
    )
    result = subprocess.run(
        manage("check", "--deploy", "--fail-level", "WARNING"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    reported = set(re.findall(r"\((\w+\.[WE]\d+)\)", output))
    assert reported <= JUSTIFIED, output
    assert "Traceback" not in output, output
    # --fail-level WARNING: any warning at all fails the command, justified ones included.
    assert result.returncode == (1 if reported else 0), output
