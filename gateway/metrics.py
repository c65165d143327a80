"""The web side's Prometheus metrics."""

from prometheus_client import Counter, Gauge

WS_CLIENTS = Gauge("gateway_ws_clients", "Open WebSocket connections")
WS_FRAMES = Counter("gateway_ws_frames_sent_total", "WebSocket text frames sent")
WS_EVENTS = Counter("gateway_ws_events_sent_total", "Device events sent over WebSockets (live and replayed)")
WS_DROPPED = Counter(
    "gateway_ws_events_dropped_total",
    "Events not delivered to a socket (replaced by a gap frame), by reason",
    ["reason"],
)
WS_REPLAY_GAPS = Counter(
    "gateway_ws_replay_gaps_total", "Replays that began with a gap (beyond GATEWAY_REPLAY_MAX or retention)"
)
WS_ERRORS = Counter("gateway_ws_errors_total", "Error frames sent in answer to bad client frames, by code", ["code"])
WS_REFUSED = Counter("gateway_ws_refused_total", "WebSocket connections refused, by close code", ["code"])
WS_STALLED = Counter(
    "gateway_ws_stalled_total", "WebSockets closed (code 4408) because the client stopped reading what it was sent"
)
HUB_BATCHES = Counter("gateway_hub_batches_total", "Event batches received from the channel layer")
HUB_LOST = Counter("gateway_hub_lost_batches_total", "Event batches lost in the channel layer (detected by sequence)")
HUB_CAUGHT_UP = Counter(
    "gateway_hub_caught_up_events_total",
    "Events a hub read from the database because their batch came late or was lost, to deliver in id order",
)
HUB_CATCH_UP_FAILURES = Counter(
    "gateway_hub_catch_up_failures_total", "Catch-up reads that failed (the missing ids became a gap)"
)
HUB_INVALID = Counter("gateway_hub_invalid_messages_total", "Malformed channel-layer messages ignored")
HUB_ERRORS = Counter("gateway_hub_layer_errors_total", "Channel-layer receive failures (the hub retries)")
LAYER_SEND_FAILURES = Counter(
    "gateway_web_layer_send_failures_total", "Channel-layer sends from the web side that failed"
)
COMMANDS_REQUESTED = Counter("gateway_commands_requested_total", "Commands requested, by outcome", ["outcome"])
