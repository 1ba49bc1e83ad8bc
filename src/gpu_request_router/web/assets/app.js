// The dashboard: sign-in with an API key, the two views (#/ and #/requests/<id>), live polling.

import { Api, ApiError, explainError } from "./api.js";
import { lineChart } from "./charts.js";
import { fill, h } from "./dom.js";
import { gpuCards } from "./gpus.js";
import { queueTables, recentTable, tiles, usageTable } from "./lists.js";
import { explanation, requestDetails } from "./request.js";

const KEY = "gpurouter.key"; // sessionStorage: gone when the tab closes
const POLL_MS = 1500;
const HISTORY_S = 180;
const VIEWS = ["login", "dashboard", "request"];

const session = { api: null, user: null, admin: false, timer: null, round: 0, history: [] };

function show(view) {
  for (const name of VIEWS) document.getElementById(`${name}-view`).hidden = name !== view;
  document.getElementById("whoami").hidden = view === "login";
}

function setStatus(text, stale = false) {
  const status = document.getElementById("live");
  status.textContent = text;
  status.classList.toggle("stale", stale);
}

// -- signing in and out ---------------------------------------------------------------------

async function signIn(key) {
  const api = new Api(key);
  // The key's user and role: /v1/quota names the user, /v1/metrics says "fleet" to an admin.
  const [quota, metrics] = await Promise.all([api.get("v1/quota"), api.get("v1/metrics")]);
  Object.assign(session, { api, user: quota.user, admin: metrics.scope === "fleet", history: [] });
  sessionStorage.setItem(KEY, key);
  fill("user-name", `${session.user} (${session.admin ? "admin" : "user"})`);
  route();
}

function signOut(message) {
  stop();
  sessionStorage.removeItem(KEY);
  Object.assign(session, { api: null, user: null, admin: false, history: [] });
  for (const id of ["tiles", "gpus", "charts", "queue", "recent", "usage", "request-details", "explain"]) fill(id);
  fill("login-error", message || "");
  setStatus("");
  document.getElementById("key").value = "";
  show("login");
}

async function onLogin(event) {
  event.preventDefault();
  const key = document.getElementById("key").value.trim();
  const button = document.getElementById("sign-in");
  if (!key) {
    fill("login-error", "Enter an API key.");
    return;
  }
  button.disabled = true;
  fill("login-error");
  try {
    await signIn(key);
  } catch (error) {
    fill("login-error", explainError(error));
  } finally {
    button.disabled = false;
  }
}

// -- polling ---------------------------------------------------------------------------------

function stop() {
  session.round += 1; // a poll in flight sees the change and does not reschedule
  clearTimeout(session.timer);
}

function route() {
  stop();
  if (!session.api) return show("login");
  const match = location.hash.match(/^#\/requests\/(.+)$/);
  const requestId = match ? decodeURIComponent(match[1]) : null;
  show(requestId ? "request" : "dashboard");
  tick(session.round, requestId);
}

async function tick(round, requestId) {
  try {
    if (!document.hidden) {
      await (requestId ? pollRequest(round, requestId) : pollFleet(round));
      if (round === session.round) setStatus(`live · updated ${new Date().toLocaleTimeString()}`);
    }
  } catch (error) {
    if (round !== session.round) return;
    if (error instanceof ApiError && error.status === 401) {
      return signOut("The router no longer accepts this key. Sign in again.");
    }
    setStatus(`not updated: ${explainError(error)}`, true);
  }
  if (round === session.round) session.timer = setTimeout(() => tick(round, requestId), POLL_MS);
}

async function act(gpuId, verb) {
  try {
    await session.api.post(`v1/gpus/${encodeURIComponent(gpuId)}/${verb}`);
    fill("action-error");
    route(); // show the change now
  } catch (error) {
    fill("action-error", `${verb} ${gpuId}: ${explainError(error)}`);
  }
}

// Each poll takes the round it belongs to, and shows nothing if the page moved on meanwhile
// (signed out, another view): what a signed-out page holds is nothing.
async function pollFleet(round) {
  const api = session.api;
  const [gpus, queued, running, recent, metrics, usage] = await Promise.all([
    api.get("v1/gpus"),
    api.get("v1/requests?status=queued&limit=500"),
    api.get("v1/requests?status=running&limit=500"),
    api.get("v1/requests?limit=25"),
    api.get("v1/metrics"),
    session.admin ? api.get("v1/users") : api.get("v1/quota"),
  ]);
  if (round !== session.round) return;
  const now = Date.now();
  record(now, metrics);
  const runningById = new Map(running.items.map((r) => [r.id, r]));
  fill("tiles", tiles(metrics));
  fill("gpus", gpuCards(gpus.items, runningById, session.admin ? act : null));
  fill("charts", charts());
  fill("queue", queueTables(metrics.queue_depth, queued.items, now));
  fill("recent", recentTable(recent.items, now));
  const entries = session.admin
    ? usage.items
    : [{ name: usage.user, role: "you", quota: usage.limits, usage: usage.usage }];
  fill("usage", usageTable(entries));
}

function record(now, metrics) {
  const queued = Object.values(metrics.queue_depth).reduce((a, b) => a + b, 0);
  const counts = metrics.requests;
  session.history.push({
    t: now,
    values: {
      succeeded: metrics.throughput_rps,
      p50: metrics.queue_wait_s.p50,
      p90: metrics.queue_wait_s.p90,
      queued,
      running: (counts.running || 0) + (counts.dispatching || 0),
    },
  });
  while (session.history.length && session.history[0].t < now - HISTORY_S * 1000) session.history.shift();
}

function charts() {
  const samples = session.history;
  return [
    lineChart("Throughput", "req/s", [{ name: "succeeded", cls: "c1" }], samples, HISTORY_S),
    lineChart("Queue wait", "s", [{ name: "p50", cls: "c1" }, { name: "p90", cls: "c2" }], samples, HISTORY_S),
    lineChart("Requests", "", [{ name: "queued", cls: "c2" }, { name: "running", cls: "c1" }], samples, HISTORY_S),
  ];
}

async function pollRequest(round, id) {
  const api = session.api;
  let request;
  try {
    request = await api.get(`v1/requests/${encodeURIComponent(id)}`);
  } catch (error) {
    if (round !== session.round) return;
    if (error instanceof ApiError && error.status === 404) {
      fill("request-title", id);
      fill("request-details", h("p", { class: "notice" }, "No such request visible to this key."));
      fill("explain");
      return;
    }
    throw error;
  }
  let explain = null;
  let refusal = null;
  try {
    explain = await api.get(`v1/requests/${encodeURIComponent(id)}/explain`);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status === 401) throw error;
    refusal = error;
  }
  if (round !== session.round) return;
  fill("request-title", request.id);
  fill("request-details", requestDetails(request));
  fill("explain", explanation(explain, refusal));
}

// -- start -----------------------------------------------------------------------------------

document.getElementById("login-form").addEventListener("submit", onLogin);
document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);

const saved = sessionStorage.getItem(KEY);
if (saved) {
  signIn(saved).catch((error) => signOut(explainError(error)));
} else {
  show("login");
}
