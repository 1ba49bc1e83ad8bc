// The dashboard's tables: the fleet at a glance, the queue, recent requests, usage and quota.

import { ageOf, badge, duration, gib, h, num } from "./dom.js";
import { requestLink } from "./gpus.js";

const CLASS_ORDER = ["critical", "high", "normal", "low", "batch"];

function byClass(a, b) {
  const rank = (name) => (CLASS_ORDER.includes(name) ? CLASS_ORDER.indexOf(name) : CLASS_ORDER.length);
  return rank(a) - rank(b) || a.localeCompare(b);
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "dim" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headers.map((name) => h("th", {}, name)))),
    h("tbody", {}, rows),
  );
}

function tile(name, value, note) {
  return h("div", { class: "tile" }, h("span", { class: "label" }, name), h("strong", {}, value), h("span", { class: "dim" }, note));
}

/** The numbers across the top: GPUs, memory, queue, running work, throughput and wait. */
export function tiles(metrics) {
  const gpus = metrics.gpus;
  const queued = Object.values(metrics.queue_depth).reduce((a, b) => a + b, 0);
  const counts = metrics.requests;
  return [
    tile("GPUs", `${gpus.schedulable} / ${gpus.count}`, `schedulable · ${gpus.healthy} healthy`),
    tile("memory", `${gib(gpus.memory_used_mb)} GiB`, `used of ${gib(gpus.memory_total_mb)} · ${gib(gpus.memory_reserved_mb)} reserved`),
    tile("queued", String(queued), "every user's"),
    tile("running", String((counts.running || 0) + (counts.dispatching || 0)), metrics.scope === "user" ? "yours" : "all users"),
    tile("throughput", `${num(metrics.throughput_rps, 2)} /s`, "succeeded, recent window"),
    tile("queue wait p50", duration(metrics.queue_wait_s.p50), `p90 ${duration(metrics.queue_wait_s.p90)}`),
  ];
}

/** The queue, one table per priority class: position, request, owner, model and age. */
export function queueTables(depths, queued, now) {
  const classes = [...new Set([...Object.keys(depths), ...queued.map((r) => r.priority)])].sort(byClass);
  const waiting = classes.filter((name) => (depths[name] || 0) > 0 || queued.some((r) => r.priority === name));
  if (!waiting.length) return [h("p", { class: "dim" }, "The queue is empty.")];
  return waiting.map((name) => {
    const mine = queued
      .filter((r) => r.priority === name)
      .sort((a, b) => (a.queue_position ?? Infinity) - (b.queue_position ?? Infinity));
    const depth = depths[name] ?? mine.length;
    return h(
      "section",
      { class: "queue-class", "data-priority": name },
      h("h3", {}, name, h("span", { class: "dim" }, ` ${depth} waiting`, mine.length < depth ? ` (${mine.length} shown)` : "")),
      table(
        ["position", "request", "user", "model", "memory", "age"],
        mine.map((r) =>
          h(
            "tr",
            { "data-request": r.id },
            h("td", { class: "num" }, r.queue_position ?? "–"),
            h("td", {}, requestLink(r.id)),
            h("td", {}, r.user),
            h("td", {}, r.model),
            h("td", { class: "num" }, `${gib(r.estimate.gpu_memory_mb)} GiB`),
            h("td", { class: "num" }, duration(ageOf(r.created_at, now))),
          ),
        ),
        "None of these is visible to this key.",
      ),
    );
  });
}

/** The newest requests with where they were placed and why. */
export function recentTable(requests, now) {
  return table(
    ["request", "user", "model", "class", "status", "GPU", "placement reason", "waited", "age"],
    requests.map((r) =>
      h(
        "tr",
        { "data-request": r.id, "data-status": r.status },
        h("td", {}, requestLink(r.id)),
        h("td", {}, r.user),
        h("td", {}, r.model),
        h("td", {}, r.priority),
        h("td", {}, badge(r.status)),
        h("td", { class: "mono" }, r.placement ? r.placement.gpu_ids.join(" ") : "–"),
        h("td", { class: "reason" }, r.placement ? r.placement.reason : r.status === "queued" ? `queued, position ${r.queue_position ?? "–"}` : "–"),
        h("td", { class: "num" }, r.status === "queued" ? "–" : duration(r.queue_wait_s)),
        h("td", { class: "num" }, duration(ageOf(r.created_at, now))),
      ),
    ),
    "No requests yet.",
  );
}

function compact(value, digits) {
  if (value >= 1e6) return `${(value / 1e6).toFixed(value >= 1e7 ? 0 : 1)}M`;
  if (value >= 1e4) return `${(value / 1e3).toFixed(0)}k`;
  return num(value, Number.isInteger(value) ? 0 : digits);
}

function against(used, limit, digits = 0) {
  const text = `${compact(used, digits)} / ${limit === null ? "∞" : compact(limit, digits)}`;
  if (limit === null) return h("td", { class: "num" }, text);
  const meter = h("meter", { min: 0, max: limit, value: used, high: limit * 0.8, optimum: 0 });
  return h("td", { class: "num quota" }, meter, " ", text);
}

/** Each user's live usage against their limits (entries: {name, role, quota, usage}). */
export function usageTable(entries) {
  return table(
    ["user", "role", "running", "queued", "req / min", "GPU-s / h", "top class"],
    entries.map((u) =>
      h(
        "tr",
        { "data-user": u.name },
        h("td", {}, u.name),
        h("td", {}, u.role ?? ""),
        against(u.usage.concurrent, u.quota.max_concurrent),
        against(u.usage.queued, u.quota.max_queued),
        against(u.usage.requests_last_minute, u.quota.requests_per_minute),
        against(u.usage.gpu_seconds_last_hour, u.quota.gpu_seconds_per_hour, 1),
        h("td", {}, u.quota.max_priority),
      ),
    ),
    "No users.",
  );
}
