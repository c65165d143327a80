// The operator console's entry point: picks the page's controller, loads its state, and connects one WebSocket
// (GatewaySocket) that feeds it. No build step: these files are served as they are, as ES modules.
//
// Modules: socket.js (the WebSocket protocol), api.js (the HTTP API), model.js (a device's state), dom.js (helpers),
// connection.js (the connection indicator and banner), fleet.js and device.js (the pages), with charts.js,
// eventlog.js and commands.js for the device page.

import { Api } from "./api.js";
import { ConnectionStatus } from "./connection.js";
import { DevicePage } from "./device.js";
import { FleetPage } from "./fleet.js";
import { GatewaySocket } from "./socket.js";

const PAGES = { fleet: FleetPage, device: DevicePage };

function readConfig() {
  const data = document.body.dataset;
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return {
    page: data.page,
    wsUrl: `${scheme}//${window.location.host}${data.wsPath || "/ws/"}`,
    apiBase: data.apiBase || "/api",
    loginUrl: data.loginUrl || "/login/",
    deviceUrl: (id) => (data.deviceUrl || "/devices/__DEVICE__/").replace("__DEVICE__", encodeURIComponent(id)),
  };
}

function readState() {
  const script = document.getElementById("console-state");
  return script ? JSON.parse(script.textContent) : {};
}

async function main() {
  const config = readConfig();
  const Page = PAGES[config.page];
  if (!Page) return;
  const connection = new ConnectionStatus();
  const api = new Api({ loginUrl: config.loginUrl, apiBase: config.apiBase });
  const page = new Page({ config, api, state: readState() });
  const after = await page.start();
  const socket = new GatewaySocket({
    url: config.wsUrl,
    devices: page.subscription,
    after,
    onEvent: (frame) => page.onEvent(frame),
    onGap: (from, to) => page.reload(from, to),
    onState: (state, detail) => connection.update(state, detail),
    onError: (frame) => page.onError(frame),
  });
  if (page.attach) page.attach(socket);
  socket.start();
  window.addEventListener("online", () => socket.reconnectNow());
  // Close the socket when the page goes away (keeps it eligible for the back/forward cache) and resume,
  // from the last id seen, if the browser brings the page back.
  window.addEventListener("pagehide", () => socket.stop());
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) socket.start();
  });
}

main();
