"""The bridge's Prometheus metrics: served by /metrics under rungateway, by GATEWAY_METRICS_BIND under runbridge."""

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from devices.records import EventRecord

MESSAGES_IN = Counter("gateway_mqtt_messages_total", "MQTT messages received, by topic kind", ["kind"])
REJECTED = Counter("gateway_mqtt_rejected_total", "MQTT messages dropped as invalid, by reason", ["reason"])
SKIPPED = Counter("gateway_ingest_skipped_total", "Valid messages not stored, by reason", ["reason"])
STORED = Counter("gateway_events_stored_total", "Events stored, by kind", ["kind"])
ANNOUNCED = Counter(
    "gateway_events_announced_total", "Stored events sent to the channel layer (towards browsers), by kind", ["kind"]
)
QUEUE_DROPPED = Counter("gateway_mqtt_queue_dropped_total", "Messages discarded because the incoming queue was full")
LAYER_FAILURES = Counter(
    "gateway_layer_send_failures_total", "Stored events that could not be sent to the channel layer"
)
RECONNECTS = Counter("gateway_mqtt_reconnects_total", "Broker connections lost or refused")
STORE_RETRIES = Counter("gateway_store_retries_total", "Batch writes retried because the database was unavailable")
CONNECTED = Gauge("gateway_mqtt_connected", "1 while the bridge holds a broker connection")
BATCH_SIZE = Histogram(
    "gateway_ingest_batch_size",
    "Messages per ingest batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
)
BATCH_SECONDS = Histogram(
    "gateway_ingest_batch_seconds",
    "Time to store a batch and hand it to the channel layer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
COMMANDS_PUBLISHED = Counter("gateway_commands_published_total", "Command publishes acknowledged by the broker")
COMMANDS_FINISHED = Counter(
    "gateway_commands_finished_total", "Commands that reached a final state in this bridge, by state", ["state"]
)
REPLIES = Counter("gateway_command_replies_total", "Command replies received, by outcome", ["outcome"])


def count_by_kind(counter: Counter, records: Iterable[EventRecord]) -> None:
    """Add a batch to a counter labelled by event kind: one increment per kind, not per event."""
    for kind, count in Tally(record.kind.value for record in records).items():
        counter.labels(kind).inc(count)


def serve(host: str, port: int) -> None:
    """Serve these metrics as Prometheus text at ``http://HOST:PORT/metrics`` from a daemon thread (``runbridge``
    with ``GATEWAY_METRICS_BIND``; web processes serve theirs at ``/metrics``)."""
    start_http_server(port, addr=host)
