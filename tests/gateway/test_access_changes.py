"""Permission changes, token revocation and abuse limits reach open sockets (contract section 3, issue 5)."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group
from django.utils import timezone

from devices import services
from devices.models import ApiToken, Device, Fleet, FleetAccess
from devices.permissions import access_for
from gateway.hub import Hub
from gateway.ratelimit import TokenBucket
from tests.gateway.test_consumers import APP, announce, frames_until, store

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def fast_refresh(settings):
    settings.GATEWAY = {**settings.GATEWAY, "ACCESS_REFRESH": 0.2}


@sync_to_async
def viewer_of_north(username: str = "alice"):
    from django.contrib.auth import get_user_model

    for device_id in ("n1", "s1"):
        Device.objects.get_or_create(id=device_id)
    user = get_user_model().objects.create_user(username=username, password="x")
    group = Group.objects.create(name=f"{username}-group")
    user.groups.add(group)
    north = Fleet.objects.create(name=f"{username}-north")
    north.devices.add(Device.objects.get(id="n1"))
    FleetAccess.objects.create(fleet=north, group=group, level="view")
    return user, group, services.issue_token(user=user)


async def open_socket(token: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(APP, f"/ws/?token={token}")
    assert (await communicator.connect())[0]
    assert (await communicator.receive_json_from())["type"] == "hello"
    return communicator


async def test_a_revoked_token_closes_its_socket_within_seconds(layer, fast_refresh):
    user, _, token = await viewer_of_north()
    communicator = await open_socket(token)
    started = time.monotonic()
    await sync_to_async(lambda: ApiToken.objects.filter(user=user).update(revoked_at=timezone.now()))()
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}
    assert time.monotonic() - started < 5


async def test_a_deactivated_user_is_disconnected(layer, fast_refresh):
    user, _, token = await viewer_of_north()
    communicator = await open_socket(token)
    user.is_active = False
    await sync_to_async(user.save)()
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_a_withdrawn_grant_shrinks_subscriptions_and_stops_events(layer, fast_refresh):
    _, group, token = await viewer_of_north()
    await store(("n1", 0))
    communicator = await open_socket(token)
    await communicator.send_json_to({"op": "subscribe", "devices": ["n1"]})
    assert await communicator.receive_json_from() == {"type": "subscribed", "devices": ["n1"]}
    await Hub.for_layer(layer).ready.wait()
    await sync_to_async(lambda: FleetAccess.objects.filter(group=group).delete())()
    assert await communicator.receive_json_from(timeout=5) == {"type": "subscribed", "devices": []}
    await announce(layer, await store(("n1", 1)))
    assert await communicator.receive_nothing(timeout=0.5)
    await communicator.disconnect()


async def test_a_new_grant_reaches_a_wildcard_socket(layer, fast_refresh):
    _, group, token = await viewer_of_north()
    communicator = await open_socket(token)
    await communicator.send_json_to({"op": "subscribe", "devices": "*"})
    assert (await communicator.receive_json_from())["devices"] == "*"
    await Hub.for_layer(layer).ready.wait()
    await announce(layer, await store(("s1", 1)))
    assert await communicator.receive_nothing(timeout=0.3), "s1 is not visible yet"

    @sync_to_async
    def grant_south() -> None:
        south = Fleet.objects.create(name="south")
        south.devices.add(Device.objects.get(id="s1"))
        FleetAccess.objects.create(fleet=south, group=group, level="view")

    await grant_south()
    await asyncio.sleep(0.8)
    await announce(layer, await store(("s1", 2)))
    seen = await frames_until(communicator, lambda f: f.get("device") == "s1")
    assert seen[-1]["values"] == {"v": 2}
    await communicator.disconnect()


async def test_flooding_gets_an_error_then_a_close(layer, settings):
    settings.GATEWAY = {**settings.GATEWAY, "WS_FRAMES_PER_SECOND": 5}
    _, _, token = await viewer_of_north()
    communicator = await open_socket(token)
    for _ in range(200):
        await communicator.send_json_to({"op": "ping"})
    outputs = []
    while True:
        output = await communicator.receive_output(timeout=2)
        outputs.append(output)
        if output["type"] == "websocket.close":
            break
    texts = [o.get("text", "") for o in outputs if o["type"] == "websocket.send"]
    assert sum('"rate_limited"' in t for t in texts) == 1
    assert sum('"pong"' in t for t in texts) == 10  # the burst (2 x the rate), then refusals
    assert outputs[-1] == {"type": "websocket.close", "code": 1008}


async def test_subscriptions_per_socket_are_capped(layer, settings):
    settings.GATEWAY = {**settings.GATEWAY, "WS_MAX_SUBSCRIPTIONS": 2}
    _, _, token = await viewer_of_north()
    communicator = await open_socket(token)
    await communicator.send_json_to({"op": "subscribe", "devices": ["n1", "a", "b"]})
    error = await communicator.receive_json_from()
    assert error["code"] == "too_many_subscriptions"
    await communicator.disconnect()


def test_token_bucket():
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5
    assert bucket.allow() and not bucket.allow()
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate=0, burst=1)


@pytest.mark.django_db
def test_commands_per_minute_are_limited_per_user(django_user_model):
    Device.objects.create(id="d", online=True)
    user = django_user_model.objects.create_superuser(username="busy", password="x")
    states = [
        services.request_command(
            user=user,
            access=access_for(user),
            device_id="d",
            name="ping",
            params={},
            request_id=None,
            timeout=30,
            offline_policy="reject",
            max_payload=65536,
            commands_per_minute=3,
        ).command.state
        for _ in range(4)
    ]
    assert states == ["pending", "pending", "pending", "rejected"]


async def test_a_refused_request_still_gets_an_answer_with_its_ref(layer, settings):
    settings.GATEWAY = {**settings.GATEWAY, "WS_FRAMES_PER_SECOND": 1}
    _, _, token = await viewer_of_north()
    communicator = await open_socket(token)
    for _ in range(2):
        await communicator.send_json_to({"op": "ping"})
    for n in range(3):
        await communicator.send_json_to({"op": "command", "device": "n1", "name": "x", "request_id": f"r{n}"})
    refs = []
    while len(refs) < 3:
        frame = await communicator.receive_json_from()
        if frame["type"] == "error" and frame["code"] == "rate_limited":
            refs.append(frame.get("ref"))
    assert refs == ["r0", "r1", "r2"]
    await communicator.disconnect()
