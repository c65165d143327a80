// The console's one WebSocket to the gateway (docs/protocol.md sections 8 and 9).

const PING_INTERVAL_MS = 25_000;
const SILENCE_LIMIT_MS = 65_000; // no frame at all for this long (pings included): the socket is dead
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 30_000;
const CATCH_UP_QUIET_MS = 400; // after subscribing, this long without a frame means the replay is over
const RECENT_IDS_MAX = 10_000;
const REQUEST_SENDS_MAX = 3; // a request sent this many times without an answer is given up (see request())
const CLOSE_UNAUTHENTICATED = 4401;
const CLOSE_FORBIDDEN = 4403;

/**
 * One WebSocket to the gateway (contract section 3) that survives reconnects without losing or repeating
 * events (section 4): it resubscribes with `after` = the highest event id received, and drops ids it has
 * already delivered (a bounded set of recent ids, since ids of different devices may arrive out of order).
 *
 * Callbacks: onEvent(frame) for each new device event; onGap(from, to) -> Promise when events could not be
 * replayed (reload state over HTTP); onState(state, {detail, retryAt}) with state one of connecting, live,
 * catching-up, reconnecting, disconnected (retryAt: when the next attempt starts, in Date.now() milliseconds, while
 * one is scheduled); onError(frame) for error frames.
 *
 * request(frame) sends a frame that carries a request_id (a command) and resolves with the server's answer.
 */
export class GatewaySocket {
  constructor({ url, devices = "*", after = 0, onEvent, onGap, onState, onError }) {
    this.url = url;
    this.devices = devices;
    this.lastId = Number.isInteger(after) && after > 0 ? after : 0;
    this.floor = this.lastId; // ids at or below it are already in the state the page started from
    this.onEvent = onEvent || (() => {});
    this.onGap = onGap || (() => Promise.resolve());
    this.onState = onState || (() => {});
    this.onError = onError || (() => {});
    this.recent = new Set();
    this.recentOrder = [];
    this.recentHead = 0;
    this.ws = null;
    this.state = null;
    this.attempt = 0;
    this.stopped = false;
    this.reconnectTimer = null;
    this.pingTimer = null;
    this.quietTimer = null;
    this.catchUpTo = 0;
    this.gaps = 0;
    this.lastFrameAt = 0;
    this.ready = false; // subscribed on the current socket
    this.outbox = new Map(); // request_id -> {frame, sends, resolve}: requests the server has not answered yet
    this.setState("connecting");
  }

  start() {
    this.stopped = false;
    this.connect();
    return this;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.clearSocketTimers();
    if (this.ws) this.ws.close(1000, "page closed");
  }

  setState(state, detail = "", retryAt = null) {
    if (state === this.state && detail === this.stateDetail && retryAt === this.retryAt) return;
    this.state = state;
    this.stateDetail = detail;
    this.retryAt = retryAt;
    this.onState(state, { detail, retryAt });
  }

  connect() {
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    if (this.stopped) return;
    if (this.attempt > 0) this.setState("reconnecting", "Reconnecting…");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      console.error("gateway: cannot open the WebSocket", error);
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.lastFrameAt = Date.now();
      this.pingTimer = setInterval(() => this.ping(), PING_INTERVAL_MS);
    };
    ws.onmessage = (message) => {
      if (ws !== this.ws) return;
      this.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (error) {
        console.warn("gateway: ignoring a frame that is not JSON", error);
        return;
      }
      this.handleFrame(frame);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.ready = false;
      this.clearSocketTimers();
      if (this.stopped) return;
      if (event.code === CLOSE_UNAUTHENTICATED) {
        this.setState("disconnected", "Signed out: log in again");
        return;
      }
      if (event.code === CLOSE_FORBIDDEN) {
        this.setState("disconnected", "Refused by the gateway");
        return;
      }
      this.scheduleReconnect();
    };
    // onerror is always followed by onclose, which does the work.
    ws.onerror = () => {};
  }

  clearSocketTimers() {
    clearInterval(this.pingTimer);
    clearTimeout(this.quietTimer);
    this.pingTimer = null;
    this.quietTimer = null;
  }

  scheduleReconnect() {
    if (this.stopped || this.reconnectTimer !== null) return;
    // Capped exponential backoff with jitter, so that a restarted gateway is not hit by every browser at once.
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(this.attempt, 16));
    const delay = cap / 2 + Math.random() * (cap / 2);
    this.attempt += 1;
    this.setState("reconnecting", `Reconnecting in ${Math.max(1, Math.round(delay / 1000))} s`, Date.now() + delay);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  reconnectNow() {
    if (this.stopped || this.ws || this.state === "disconnected") return;
    this.connect();
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  /** Whether a request made now goes out at once (otherwise it waits for the connection). */
  get connected() {
    return this.ready && this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /**
   * Send a frame that carries a `request_id` and keep it until the server answers: a command frame with that
   * request_id, or an error frame whose `ref` is it. The promise resolves with that frame. A request made while
   * the socket is down waits; one whose answer was lost with the connection is sent again after each
   * reconnect, with the same request_id, so the server hands back the existing command instead of creating a
   * second one. After REQUEST_SENDS_MAX unanswered sends (the request itself may be breaking the connection)
   * it resolves with an error frame of code "no_answer".
   */
  request(frame) {
    const requestId = frame.request_id;
    const known = this.outbox.get(requestId);
    if (known) return known.promise;
    const entry = { frame, sends: 0, sentOn: null, resolve: null, promise: null };
    entry.promise = new Promise((resolve) => {
      entry.resolve = resolve;
    });
    this.outbox.set(requestId, entry);
    if (this.connected) this.sendRequest(entry);
    return entry.promise;
  }

  sendRequest(entry) {
    if (entry.sends >= REQUEST_SENDS_MAX) {
      this.answer(entry.frame.request_id, {
        type: "error",
        code: "no_answer",
        message: `no answer from the gateway after ${entry.sends} attempts`,
        ref: entry.frame.request_id,
      });
      return;
    }
    if (this.send(entry.frame)) {
      entry.sends += 1;
      entry.sentOn = this.ws;
    }
  }

  /**
   * A frame the server could not read (too large, not JSON) is refused without a `ref`. The server answers a
   * socket's frames in order and only a request can be that large, so it is the oldest request still waiting
   * for its answer on this socket.
   */
  unreadableRequest(frame) {
    if (frame.ref !== undefined || !["too_large", "bad_json"].includes(frame.code)) return false;
    for (const [requestId, entry] of this.outbox) {
      if (entry.sentOn === this.ws) return this.answer(requestId, frame);
    }
    return false;
  }

  answer(requestId, frame) {
    const entry = typeof requestId === "string" ? this.outbox.get(requestId) : undefined;
    if (!entry) return false;
    this.outbox.delete(requestId);
    entry.resolve(frame);
    return true;
  }

  ping() {
    if (Date.now() - this.lastFrameAt > SILENCE_LIMIT_MS && this.ws) {
      // Half-open connection (laptop lid, NAT timeout): give up on it and reconnect.
      console.warn("gateway: no frame for a while, reconnecting");
      const ws = this.ws;
      this.ws = null;
      this.clearSocketTimers();
      ws.close(4000, "silent");
      this.scheduleReconnect();
      return;
    }
    this.send({ op: "ping" });
  }

  handleFrame(frame) {
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "hello":
        this.onHello(frame);
        break;
      case "subscribed":
        this.attempt = 0;
        if (!this.ready) {
          this.ready = true;
          for (const entry of [...this.outbox.values()]) this.sendRequest(entry);
        }
        if (this.catchUpTo) this.armQuietTimer(CATCH_UP_QUIET_MS);
        else this.maybeLive();
        break;
      case "pong":
        break;
      case "error":
        console.warn("gateway error frame:", frame.code, frame.message);
        if (this.answer(frame.ref, frame) || this.unreadableRequest(frame)) break; // the requester shows it
        this.onError(frame);
        break;
      case "gap":
        this.handleGap(frame);
        break;
      case "batch":
        if (Array.isArray(frame.events)) {
          for (const event of frame.events) this.handleEvent(event);
        }
        break;
      default:
        this.handleEvent(frame);
    }
  }

  onHello(frame) {
    const serverLast = Number.isInteger(frame.last_id) ? frame.last_id : 0;
    const subscribe = { op: "subscribe", devices: this.devices, after: this.lastId };
    this.catchUpTo = serverLast > this.lastId ? serverLast : 0;
    this.setState(this.catchUpTo ? "catching-up" : "connecting", this.catchUpTo ? "Catching up…" : "Subscribing…");
    this.send(subscribe);
  }

  /** Go live once no frame has arrived for CATCH_UP_QUIET_MS (the replay, if any, is then over). */
  armQuietTimer(delay) {
    clearTimeout(this.quietTimer);
    this.quietTimer = setTimeout(() => {
      const quietFor = Date.now() - this.lastFrameAt;
      if (quietFor >= CATCH_UP_QUIET_MS) this.maybeLive(true);
      else this.armQuietTimer(CATCH_UP_QUIET_MS - quietFor);
    }, delay);
  }

  maybeLive(quiet = false) {
    if (!this.ws || this.gaps > 0) return;
    if (this.catchUpTo && this.lastId < this.catchUpTo && !quiet) return;
    this.catchUpTo = 0;
    this.setState("live", "Live");
  }

  handleEvent(frame) {
    const id = frame && frame.id;
    if (!Number.isInteger(id) || typeof frame.device !== "string") return;
    if (id > this.lastId) this.lastId = id;
    // Checked before the duplicate test: the answer to a resent request can be an event already delivered.
    if (frame.type === "command" && this.outbox.size) this.answer(frame.request_id, frame);
    if (id <= this.floor || this.recent.has(id)) return;
    this.remember(id);
    try {
      this.onEvent(frame);
    } catch (error) {
      console.error("gateway: failed to apply an event", frame, error);
    }
    if (this.catchUpTo && id >= this.catchUpTo) this.maybeLive();
  }

  remember(id) {
    // A ring buffer of the ids delivered most recently, mirrored in a Set for O(1) lookups.
    if (this.recentOrder.length < RECENT_IDS_MAX) {
      this.recentOrder.push(id);
    } else {
      this.recent.delete(this.recentOrder[this.recentHead]);
      this.recentOrder[this.recentHead] = id;
      this.recentHead = (this.recentHead + 1) % RECENT_IDS_MAX;
    }
    this.recent.add(id);
  }

  handleGap(frame) {
    const from = Number(frame.from);
    const to = Number(frame.to);
    if (Number.isFinite(to) && to > this.lastId) this.lastId = to;
    this.gaps += 1;
    this.setState("catching-up", "Reloading state…");
    Promise.resolve()
      .then(() => this.onGap(from, to))
      .catch((error) => console.error("gateway: reloading state after a gap failed", error))
      .finally(() => {
        this.gaps -= 1;
        if (this.gaps > 0 || !this.ws) return;
        this.maybeLive();
        if (this.state !== "live") this.armQuietTimer(CATCH_UP_QUIET_MS);
      });
  }
}
