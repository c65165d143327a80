// The console's HTTP client for the gateway's JSON API (the browser session authenticates; a POST carries the
// csrftoken cookie's value as X-CSRFToken, as Django expects).

const RETRIES = 4;

class SignedOut extends Error {
  constructor() {
    super("signed out");
    this.name = "SignedOut";
  }
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** A URL with the non-empty values of `params` as its query string. */
function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "" && value !== false) query.set(key, String(value));
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

function csrfToken() {
  for (const part of document.cookie.split(";")) {
    const [name, ...rest] = part.trim().split("=");
    if (name === "csrftoken") return decodeURIComponent(rest.join("="));
  }
  return "";
}

async function answer(response, loginUrl) {
  const type = response.headers.get("content-type") || "";
  const json = type.includes("application/json");
  if (response.ok && json) return response.json();
  if (response.redirected || response.status === 401) {
    window.location.assign(loginUrl);
    throw new SignedOut();
  }
  const body = json ? await response.json().catch(() => ({})) : {};
  throw new ApiError(response.status, body.error, body.message || `${response.url}: HTTP ${response.status}`);
}

/** Whether a failed request is worth repeating (the network or the server, not the request itself). */
function retryable(error) {
  if (error instanceof SignedOut || error.name === "AbortError") return false;
  return !(error instanceof ApiError) || error.status >= 500 || error.status === 429;
}

export class Api {
  constructor({ loginUrl, apiBase = "/api" }) {
    this.loginUrl = loginUrl;
    this.base = apiBase.replace(/\/$/, "");
  }

  url(path, params = {}) {
    return withQuery(`${this.base}${path}`, params);
  }

  /** GET JSON; network and server errors are retried with backoff (1, 2, 4, 8 s), unless `signal` aborts. */
  async get(url, { signal, retries = RETRIES } = {}) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        const response = await fetch(url, {
          credentials: "same-origin",
          headers: { Accept: "application/json" },
          cache: "no-store",
          signal,
        });
        return await answer(response, this.loginUrl);
      } catch (error) {
        if (attempt >= retries || !retryable(error)) throw error;
        await sleep(1000 * 2 ** attempt, signal);
      }
    }
  }

  async post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      body: JSON.stringify(body),
    });
    return answer(response, this.loginUrl);
  }

  // --- the endpoints the console uses ---

  devices(params, options) {
    return this.get(this.url("/devices", params), options);
  }

  device(id, options) {
    return this.get(this.url(`/devices/${encodeURIComponent(id)}`), options);
  }

  telemetry(id, params, options) {
    return this.get(this.url(`/devices/${encodeURIComponent(id)}/telemetry`, params), options);
  }

  events(id, params, options) {
    return this.get(this.url(`/devices/${encodeURIComponent(id)}/events`, params), options);
  }

  acknowledge(id) {
    return this.post(this.url(`/devices/${encodeURIComponent(id)}/alerts/ack`), {});
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    });
  });
}
