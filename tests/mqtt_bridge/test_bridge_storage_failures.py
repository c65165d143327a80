"""How the bridge treats database failures, with a store that fails on cue (the database itself is real)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from channels.layers import InMemoryChannelLayer
from django.db import DataError, OperationalError

from devices.records import EventKind, IngestResult, Observation, Rejection
from mqtt_bridge.bridge import Bridge, BridgeSettings
from mqtt_bridge.client import InboundMessage, MqttClient, MqttConfig
from mqtt_bridge.store import BridgeStore

pytestmark = [pytest.mark.django_db(transaction=True)]


class FlakyStore(BridgeStore):
    """The real store, but the next calls fail as scripted: ``"poison"`` fails any batch holding a poisoned
    device, ``"outage"`` fails the next ``n`` calls whatever they hold."""

    def __init__(self) -> None:
        super().__init__(auto_register=True, max_devices=100)
        self.outages = 0
        self.calls = 0

    async def ingest(self, observations: Sequence[Observation]) -> IngestResult:
        self.calls += 1
        if self.outages:
            self.outages -= 1
            raise OperationalError("server closed the connection unexpectedly")
        if any(o.device_id == "poison" for o in observations):
            raise DataError("unsupported Unicode escape sequence")
        return await super().ingest(observations)


class RecordingClient(MqttClient):
    def __init__(self) -> None:
        super().__init__(MqttConfig(host="127.0.0.1", port=1, client_id="unused"))
        self.acked: list[int] = []

    def ack(self, message: InboundMessage) -> None:
        self.acked.append(message.mid)


def message(device: str, mid: int) -> InboundMessage:
    return InboundMessage(
        topic=f"devices/{device}/telemetry", payload=b'{"v": 1}', qos=1, retain=False, mid=mid, generation=0
    )


def bridge(store: FlakyStore) -> Bridge:
    return Bridge(
        client_factory=lambda: RecordingClient(),
        channel_layer=InMemoryChannelLayer(),
        settings=BridgeSettings(name="t"),
        store=store,
    )


async def test_a_poison_message_is_dropped_and_the_rest_of_its_batch_stored():
    store = FlakyStore()
    client = RecordingClient()
    await bridge(store).flush(client, [message("a", 1), message("poison", 2), message("b", 3)])
    assert client.acked == [1, 2, 3]
    from devices.models import Event

    assert sorted(await _devices_stored()) == ["a", "b"]
    assert await _count(Event) == 2


async def test_an_outage_during_the_one_by_one_fallback_holds_the_batch_instead_of_dropping_it():
    store = FlakyStore()
    client = RecordingClient()
    engine = bridge(store)
    store.outages = 0
    original = store.ingest

    async def poison_then_outage(observations: Sequence[Observation]) -> IngestResult:
        if store.calls == 1:  # the second call is the first one-by-one store: the database goes away
            store.outages = 2
        return await original(observations)

    store.ingest = poison_then_outage  # type: ignore[method-assign]
    started = time.monotonic()
    await engine.flush(client, [message("poison", 1), message("a", 2)])
    assert client.acked == [1, 2]
    assert sorted(await _devices_stored()) == ["a"], "a must be stored once the database is back, not dropped"
    assert time.monotonic() - started < 5


async def _devices_stored() -> list[str]:
    from asgiref.sync import sync_to_async

    from devices.models import Event

    return await sync_to_async(lambda: list(Event.objects.values_list("device_id", flat=True)))()


async def _count(model: type) -> int:
    from asgiref.sync import sync_to_async

    return await sync_to_async(model.objects.count)()  # type: ignore[attr-defined]


def test_rejection_reasons_are_metric_labels():
    assert {r.value for r in Rejection} >= {"duplicate_seq", "device_cap", "store_error"}
    assert EventKind.TELEMETRY.value == "telemetry"
