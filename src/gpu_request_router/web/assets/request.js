// A request's page: the request itself and its explanation (GET /v1/requests/{id}/explain).

import { ApiError } from "./api.js";
import { ageOf, badge, duration, gib, h } from "./dom.js";

function row(name, ...value) {
  return [h("dt", {}, name), h("dd", {}, ...value)];
}

function when(iso) {
  return iso ? `${iso.slice(0, 10)} ${iso.slice(11, 19)} UTC` : "–";
}

/** How long a running request has run, against its estimate. */
function progress(r) {
  const ran = ageOf(r.started_at);
  const expected = r.estimate.duration_s;
  return row(
    "running for",
    h("meter", { min: 0, max: expected, value: Math.min(ran, expected), class: "progress" }),
    ` ${duration(ran)} of about ${duration(expected)} expected`,
  );
}

/** The request's fields as a definition list. */
export function requestDetails(r) {
  const placement = r.placement;
  return h(
    "dl",
    { class: "details" },
    row("status", badge(r.status)),
    row("user", r.user),
    row("model", `${r.model} (${r.task})`),
    row("class", r.priority),
    r.status === "queued" ? row("queue position", r.queue_position ?? "–") : null,
    row("created", when(r.created_at)),
    row("started", when(r.started_at)),
    row("finished", when(r.finished_at)),
    r.status === "running" && r.started_at ? progress(r) : null,
    row("waited", duration(r.queue_wait_s)),
    row("attempts", r.attempts),
    row("GPU", placement ? h("span", { class: "mono" }, placement.gpu_ids.join(" ")) : "–"),
    row("placement reason", placement ? placement.reason : "–"),
    row("estimate", `${gib(r.estimate.gpu_memory_mb)} GiB, ${duration(r.estimate.duration_s)}`),
    row("shape", `batch ${r.shape.batch_size} × ${r.shape.input_tokens} in, ${r.shape.output_tokens} out`),
    r.error ? row("error", `${r.error.type}: ${r.error.message}`) : null,
    Object.keys(r.metadata).length ? row("metadata", JSON.stringify(r.metadata)) : null,
    r.result !== null && r.result !== undefined
      ? row("result", h("pre", {}, JSON.stringify(r.result, null, 2).slice(0, 4000)))
      : null,
  );
}

function candidates(list) {
  if (!list.length) return h("p", { class: "dim" }, "No candidate GPUs were considered.");
  const scores = [...new Set(list.flatMap((c) => Object.keys(c.score || {})))];
  return h(
    "table",
    { class: "candidates" },
    h(
      "thead",
      {},
      h("tr", {}, ["GPU", "worker", "type", "chosen", ...scores, "note"].map((name) => h("th", {}, name))),
    ),
    h(
      "tbody",
      {},
      list.map((c) =>
        h(
          "tr",
          { class: c.chosen ? "chosen" : null, "data-gpu": c.gpu_id },
          h("td", { class: "mono" }, c.gpu_id),
          h("td", {}, c.worker),
          h("td", {}, c.type),
          h("td", {}, c.chosen ? "✓" : ""),
          scores.map((name) => {
            const value = (c.score || {})[name];
            return h("td", { class: "num" }, typeof value === "number" ? String(Math.round(value * 1000) / 1000) : "–");
          }),
          h("td", {}, c.note || ""),
        ),
      ),
    ),
  );
}

function waiting(w) {
  return h(
    "div",
    { class: "waiting" },
    h("h3", {}, "Why it waits"),
    h(
      "dl",
      { class: "details" },
      row("blocked by", w.blocked_by),
      row("detail", w.detail),
      row("queue position", w.queue_position),
      row("expected start", w.eta_s === null ? "unknown" : `in about ${duration(w.eta_s)}`),
    ),
  );
}

/** The explanation, or why there is none (error: the API's refusal). */
export function explanation(explain, error) {
  if (error) {
    const text =
      error instanceof ApiError && error.status === 404
        ? "No explanation is available for this request: the router answered 404 to GET /v1/requests/{id}/explain."
        : `The explanation could not be read: ${error.message}`;
    return [h("p", { class: "notice", id: "explain-unavailable" }, text)];
  }
  const placement = explain.placement;
  return [
    h("p", { class: "summary" }, explain.summary),
    h(
      "dl",
      { class: "details" },
      row("placed on", placement ? h("span", { class: "mono" }, `${placement.gpu_id} (${placement.worker})`) : "–"),
      row("policy", explain.policy ?? "–"),
      row("reason", explain.reason ?? "–"),
    ),
    h("h3", {}, "Candidates"),
    candidates(explain.candidates || []),
    explain.waiting ? waiting(explain.waiting) : null,
  ];
}
