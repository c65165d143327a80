import time
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from devices import services
from devices.models import BridgeHeartbeat, Device, Event
from devices.records import EventKind, Observation

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client):
    user = get_user_model().objects.create_superuser(username="op", password="pw")
    client.force_login(user)
    return user


def test_healthz_answers_without_login(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.content == b"ok\n"


def test_readyz_reports_each_check_and_fails_without_a_bridge(client):
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 503 and body["ready"] is False
    assert body["checks"]["database"]["ok"] and body["checks"]["channel_layer"]["ok"]
    assert body["checks"]["broker"] == {"ok": False, "detail": "no bridge reports a broker connection"}
    services.record_bridge_heartbeat(name="bridge-1", connected=True)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["broker"]["detail"] == "connected via bridge-1"


def test_readyz_says_why_running_bridges_have_no_broker(client):
    """A bridge that reports in but cannot reach the broker says why; a silent (stale) one is not quoted."""
    services.record_bridge_heartbeat(
        name="bridge-1", connected=False, detail="cannot connect to mqtt://127.0.0.1:1883: Connection refused"
    )
    services.record_bridge_heartbeat(name="bridge-old", connected=False, detail="stale news")
    BridgeHeartbeat.objects.filter(name="bridge-old").update(updated_at=timezone.now() - timedelta(hours=1))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"] == {
        "ok": False,
        "detail": "no bridge reports a broker connection "
        "(bridge-1: cannot connect to mqtt://127.0.0.1:1883: Connection refused)",
    }


def test_metrics_are_prometheus_text(client):
    response = client.get("/metrics")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    for name in ("gateway_ws_events_dropped_total", "gateway_hub_lost_batches_total", "gateway_ws_clients"):
        assert f"# TYPE {name} " in text


def test_console_pages_need_a_login(client):
    for url in ("/", "/devices/x/", "/console/state.json"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_state_reflects_the_last_id_read_before_the_devices(client, operator):
    observations = [
        Observation(device_id="a", kind=EventKind.TELEMETRY, received_at=time.time(), body={"values": {"t": 1}})
    ]
    stored = services.ingest(observations=observations, auto_register=True, max_devices=10).stored
    body = client.get("/console/state.json").json()
    assert body["last_id"] == stored[0].id
    assert body["devices"][0]["id"] == "a" and body["devices"][0]["latest"] == {"t": 1}


def test_device_page_404s_for_unknown_devices(client, operator):
    assert client.get("/devices/nope/").status_code == 404
    Device.objects.create(id="dev-1")
    assert client.get("/devices/dev-1/").status_code == 200


def test_admin_pages_render(client, operator):
    Device.objects.create(id="dev-1")
    for model in ("device", "event", "fleet", "apitoken", "bridgeheartbeat", "command"):
        assert client.get(reverse(f"admin:devices_{model}_changelist")).status_code == 200


def test_management_commands(capsys, operator):
    call_command("issue_token", "op")
    token = capsys.readouterr().out.strip()
    assert token.startswith("gw_") and operator.api_tokens.count() == 1
    call_command("create_operator", "--username", "newop")
    assert "password:" in capsys.readouterr().out
    call_command("create_operator", "--username", "newop")
    assert "exists" in capsys.readouterr().out
    old = Observation(
        device_id="a", kind=EventKind.TELEMETRY, received_at=time.time() - 90 * 86400, body={"values": {"t": 1}}
    )
    services.ingest(observations=[old], auto_register=True, max_devices=10)
    call_command("purge_history")
    assert "Removed 1 events" in capsys.readouterr().out and not Event.objects.exists()


def test_the_fleet_page_offers_the_visible_kinds_and_fleets_as_filters(client, operator):
    from devices.models import Fleet

    pump = Device.objects.create(id="p-1", kind="pump")
    Device.objects.create(id="v-1", kind="valve")
    Fleet.objects.create(name="north").devices.add(pump)
    response = client.get("/")
    assert response.status_code == 200 and response.context["kinds"] == ["pump", "valve"]
    assert response.context["fleets"] == ["north"]
    html = response.content.decode()
    assert '<option value="pump">pump</option>' in html and '<option value="north">north</option>' in html
    assert 'id="console-state"' not in html  # the devices come from /api/devices, a page at a time


def test_the_device_page_embeds_its_state_newest_events_and_latest_command_states(client, operator):
    now = time.time()
    stored = services.ingest(
        observations=[
            Observation(device_id="d", kind=EventKind.TELEMETRY, received_at=now, body={"values": {"t": n}})
            for n in range(60)
        ],
        auto_register=True,
        max_devices=10,
    ).stored
    state = client.get("/devices/d/").context["state"]
    assert state["last_id"] == stored[-1].id and state["device"]["latest"] == {"t": 59}
    assert [frame["id"] for frame in state["events"]] == [record.id for record in reversed(stored[-50:])]
    assert state["commands"] == []
