// What the page says about its live connection: the indicator in the header, and a plain banner under it
// whenever the page is not live (connecting, disconnected and retrying in N s, catching up).

const LABELS = {
  connecting: "Connecting…",
  live: "Live",
  "catching-up": "Catching up…",
  reconnecting: "Reconnecting…",
  disconnected: "Disconnected",
};

const BANNER_DELAY_MS = 1_000; // a page that goes live within this long never shows the banner

export class ConnectionStatus {
  constructor() {
    this.indicator = document.getElementById("connection");
    this.banner = document.getElementById("connection-banner");
    this.bannerText = this.banner ? this.banner.querySelector(".banner-text") : null;
    this.state = "connecting";
    this.detail = "";
    this.retryAt = null;
    this.ticker = null;
    this.shownAt = performance.now() + BANNER_DELAY_MS;
    setTimeout(() => this.render(), BANNER_DELAY_MS);
  }

  /** The socket's onState callback. */
  update(state, { detail = "", retryAt = null } = {}) {
    this.state = state;
    this.detail = detail;
    this.retryAt = retryAt;
    clearInterval(this.ticker);
    this.ticker = retryAt ? setInterval(() => this.render(), 1_000) : null;
    this.render();
  }

  render() {
    const text = LABELS[this.state] || this.state;
    if (this.indicator) {
      this.indicator.dataset.state = this.state;
      const label = this.indicator.querySelector(".connection-label");
      if (label) label.textContent = this.state === "disconnected" && this.detail ? this.detail : text;
      this.indicator.title = this.detail || text;
    }
    this.renderBanner();
  }

  renderBanner() {
    if (!this.banner) return;
    const message = this.message();
    const show = Boolean(message) && performance.now() >= this.shownAt;
    this.banner.dataset.state = this.state;
    if (this.bannerText.textContent !== message) this.bannerText.textContent = message;
    this.banner.hidden = !show;
  }

  /** The banner's sentence for the current state; empty when live. */
  message() {
    switch (this.state) {
      case "live":
        return "";
      case "connecting":
        return "Connecting to the gateway… Values shown may be out of date until the live connection is up.";
      case "catching-up":
        return "Catching up: replaying what happened while this page was not connected…";
      case "reconnecting": {
        const seconds = this.retryAt ? Math.max(0, Math.ceil((this.retryAt - Date.now()) / 1000)) : 0;
        const when = seconds > 0 ? `retrying in ${seconds} s` : "retrying now";
        return `Disconnected from the gateway, ${when}. Values shown may be out of date.`;
      }
      case "disconnected":
        return `Disconnected: ${this.detail || "the gateway closed the connection"}. Reload the page to try again.`;
      default:
        return this.detail || this.state;
    }
  }
}
