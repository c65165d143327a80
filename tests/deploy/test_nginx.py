"""deploy/nginx for real: the example site in an nginx of the test's own, with a throwaway certificate, in front of
Daphne started exactly as gateway-web@.service starts it (its ExecStart under its system-call sandbox) and of a
second upstream that is down (an instance being restarted)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from websockets.sync.client import connect

from devices import services
from tests.deploy.helpers import DEPLOY, Tls, Units, require_binary, substitute
from tests.support import GatewayProcess, free_port, gateway_env, http_ok, wait_for

pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Site:
    https_port: int
    http_port: int
    web_port: int
    tls: Tls

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca))

    def request(self, method: str, path: str, *, body: bytes | None = None, source: str = "127.0.0.1") -> Answer:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.https_port, context=self.context(), timeout=10, source_address=(source, 0)
        )
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return Answer(status=response.status, headers=response.headers, body=response.read())


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tls: Tls, units: Units, django_db_setup: None) -> Iterator[Site]:
    """nginx and one Daphne for the module (the test database exists by then: django_db_setup)."""
    nginx = require_binary("nginx", "nginx")
    tmp_path = tmp_path_factory.mktemp("nginx")
    https_port, http_port, web_port, down_port = free_port(), free_port(), free_port(), free_port()
    static = tmp_path / "static"
    (static / "gateway").mkdir(parents=True)
    (static / "gateway" / "probe.css").write_text("body { color: teal }\n")
    (tmp_path / "iot-gateway.conf").write_text(
        substitute(
            (DEPLOY / "nginx" / "iot-gateway.conf").read_text(),
            {
                "listen 80;": f"listen 127.0.0.1:{http_port};",
                "listen [::]:80;": "",
                "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
                "listen [::]:443 ssl http2;": "",
                "server 127.0.0.1:8001 ": f"server 127.0.0.1:{web_port} ",
                "server 127.0.0.1:8002 ": f"server 127.0.0.1:{down_port} ",
                "/etc/letsencrypt/live/gateway.example.com/fullchain.pem": str(tls.certificate),
                "/etc/letsencrypt/live/gateway.example.com/privkey.pem": str(tls.key),
                "/opt/iot-gateway/static/": f"{static}/",
                "gateway.example.com": "localhost",
            },
        )
    )
    # What Debian's /etc/nginx/nginx.conf provides around a site, in this directory.
    temp_paths = "".join(f"{kind}_temp_path {tmp_path}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi"))
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {tmp_path}/nginx.pid;\nevents {{ worker_connections 256; }}\n"
        + f"http {{\ninclude /etc/nginx/mime.types;\naccess_log {tmp_path}/access.log;\n{temp_paths}"
        + f"uwsgi_temp_path {tmp_path}/uwsgi;\nscgi_temp_path {tmp_path}/scgi;\n"
        + f"include {tmp_path}/iot-gateway.conf;\n}}\n"
    )
    command = [nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(tmp_path / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    env = gateway_env(DJANGO_HTTPS="1", DJANGO_ALLOWED_HOSTS="localhost,127.0.0.1")
    web = GatewayProcess(units.sandboxed("gateway-web@.service", str(web_port)), env, name="web-unit").start()
    proxy = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{web_port}/healthz") or not web.alive(), timeout=30, what="web")
        assert web.alive(), web.log()
        wait_for(lambda: port_open(https_port) or proxy.poll() is not None, timeout=10, what="nginx")
        assert proxy.poll() is None, proxy.stderr.read() if proxy.stderr else ""
        yield Site(https_port=https_port, http_port=http_port, web_port=web_port, tls=tls)
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        web.kill(signal.SIGTERM)
    assert "Traceback" not in web.log(), web.log()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_web_units_start_check_sees_the_instance_listening(site, units):
    """ExecStartPost= (what makes a restart wait until Daphne listens) works under the unit's sandbox."""
    check = units.sandboxed("gateway-web@.service", str(site.web_port), key="ExecStartPost")
    assert subprocess.run(check, capture_output=True, timeout=30).returncode == 0


def test_https_reaches_daphne_even_with_one_instance_down(site):
    for _ in range(6):  # least_conn alternates; the instance that is down is skipped, never answered with a 502
        response = site.request("GET", "/healthz")
        assert response.status == 200


def test_django_sees_https_through_the_proxy(site):
    response = site.request("GET", "/login/")
    # DJANGO_HTTPS=1 redirects plain HTTP: a 200 means X-Forwarded-Proto was passed and trusted.
    assert response.status == 200
    assert response.headers["Strict-Transport-Security"].startswith("max-age=31536000")


def test_plain_http_is_redirected_to_https(site):
    connection = http.client.HTTPConnection("127.0.0.1", site.http_port, timeout=10)
    connection.request("GET", "/devices/d-1/?x=1")
    response = connection.getresponse()
    assert response.status == 301
    assert response.headers["Location"] == "https://127.0.0.1/devices/d-1/?x=1"


def test_static_files_come_from_the_static_root_with_caching(site):
    response = site.request("GET", "/static/gateway/probe.css")
    assert response.status == 200
    assert response.headers.get_all("Cache-Control") == ["public, max-age=3600"]
    assert response.body == b"body { color: teal }\n"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.django_db(transaction=True)
def test_websockets_are_upgraded_through_the_proxy(site):
    user = get_user_model().objects.create_superuser(username="nginx-ws", password="x")
    token = services.issue_token(user=user)
    url = f"wss://127.0.0.1:{site.https_port}/ws/?token={token}"
    with connect(url, ssl=site.context()) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.send(json.dumps({"op": "subscribe", "devices": "*"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"


def test_metrics_are_per_instance_and_local_only(site):
    response = site.request("GET", f"/metrics/{site.web_port}")
    assert response.status == 200 and b"gateway_ws_clients" in response.body
    assert site.request("GET", f"/metrics/{site.web_port}", source="127.0.0.2").status == 403
    assert site.request("POST", f"/metrics/{site.web_port}").status == 403
    assert site.request("GET", "/metrics").status == 404


def test_bodies_are_limited(site):
    assert site.request("POST", "/api/commands", body=b"x" * (2 * 1024 * 1024)).status == 413
