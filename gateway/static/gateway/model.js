// What a page knows about one device, folded from HTTP snapshots and live event frames.

import { compareText } from "./dom.js";

const ALERT_SEVERITIES = ["warning", "critical"];

/** Whether an event frame raises an alert (a warning or critical device event). */
export function isAlert(frame) {
  return frame.type === "event" && ALERT_SEVERITIES.includes(frame.severity);
}

/**
 * Every field remembers the id of the event that set it, so that applying a snapshot (which reflects all events
 * up to its last_id) and live events in any order always keeps the newest value.
 *
 * Snapshots are the API's Device objects (`/api/devices`) or the console's own state entries (a subset).
 */
export class DeviceModel {
  constructor(id) {
    this.id = id;
    this.name = "";
    this.kind = "";
    this.fleets = [];
    this.online = false;
    this.onlineId = -1;
    this.lastSeen = null; // unix seconds
    this.values = new Map(); // metric -> {value, id, ts}
    this.alerting = false; // unacknowledged warning or critical events in the last hour
    this.alerts = 0;
    this.alertId = -1;
  }

  applySnapshot(entry, snapshotId) {
    if (typeof entry.name === "string") this.name = entry.name;
    if (typeof entry.kind === "string") this.kind = entry.kind;
    if (Array.isArray(entry.fleets)) this.fleets = entry.fleets.map(String);
    if (snapshotId >= this.onlineId) {
      this.online = Boolean(entry.online);
      this.onlineId = snapshotId;
    }
    if (typeof entry.alerting === "boolean" && snapshotId >= this.alertId) {
      this.alerting = entry.alerting;
      this.alerts = Number.isInteger(entry.alerts) ? entry.alerts : Number(entry.alerting);
      this.alertId = snapshotId;
    }
    this.seen(entry.last_seen);
    const latest = entry.latest && typeof entry.latest === "object" ? entry.latest : {};
    const ts = typeof entry.latest_ts === "number" ? entry.latest_ts : null;
    for (const [metric, value] of Object.entries(latest)) {
      const current = this.values.get(metric);
      if (!current || current.id <= snapshotId) this.values.set(metric, { value, id: snapshotId, ts });
    }
  }

  /** Fold one event frame in; returns what changed: "values", "status", "alert", "seen" or "" (nothing). */
  apply(frame) {
    switch (frame.type) {
      case "telemetry": {
        const values = frame.values && typeof frame.values === "object" ? frame.values : {};
        for (const [metric, value] of Object.entries(values)) {
          const current = this.values.get(metric);
          if (!current || current.id <= frame.id) this.values.set(metric, { value, id: frame.id, ts: frame.ts });
        }
        this.seen(frame.ts);
        return "values";
      }
      case "status":
        if (frame.id >= this.onlineId) {
          this.online = Boolean(frame.online);
          this.onlineId = frame.id;
        }
        if (frame.online) this.seen(frame.ts);
        return "status";
      case "event":
        this.seen(frame.ts);
        if (!isAlert(frame) || frame.id <= this.alertId) return "seen";
        this.alerting = true;
        this.alerts += 1;
        this.alertId = frame.id;
        return "alert";
      default:
        return "";
    }
  }

  /** An operator acknowledged the device's alerts (the API answered with the device as it is now). */
  acknowledged(entry) {
    this.alerting = Boolean(entry && entry.alerting);
    this.alerts = entry && Number.isInteger(entry.alerts) ? entry.alerts : 0;
  }

  seen(ts) {
    if (typeof ts === "number" && (this.lastSeen === null || ts > this.lastSeen)) this.lastSeen = ts;
  }

  sortedMetrics() {
    return [...this.values.keys()].sort(compareText);
  }
}
