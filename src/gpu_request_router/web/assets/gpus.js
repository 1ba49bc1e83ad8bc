// The GPU grid: one card per GPU with its memory, utilisation, health, cordon state and work.

import { badge, gib, h, num } from "./dom.js";

/** A request's link to its page. */
export function requestLink(id) {
  return h("a", { href: `#/requests/${encodeURIComponent(id)}`, class: "mono" }, id);
}

/**
 * The memory bar: memory in use outside the router's reservations (weights of loaded models,
 * other processes), the router's reservations, what placement may still use, and the rest
 * (the safety margin) as the track itself.
 */
function memoryBar(gpu) {
  const total = Math.max(1, gpu.memory_total_mb);
  const outside = Math.max(0, gpu.memory_used_mb - gpu.memory_reserved_mb);
  const part = (mib, cls, name) =>
    h("span", {
      class: `seg ${cls}`,
      "data-mib": mib,
      title: `${name}: ${gib(mib)} GiB`,
    });
  const bar = h(
    "div",
    { class: "membar", role: "img", "aria-label": "memory" },
    part(outside, "used", "used outside reservations"),
    part(gpu.memory_reserved_mb, "reserved", "reserved by the router"),
    part(gpu.memory_free_mb, "free", "free for placement"),
  );
  // Widths go through the CSSOM (the page's policy allows no inline style attributes).
  for (const seg of bar.children) seg.style.width = `${(100 * Number(seg.dataset.mib)) / total}%`;
  return bar;
}

function utilisation(gpu) {
  const pct = gpu.utilization_pct;
  const meter = h("meter", { min: 0, max: 100, value: pct ?? 0, class: "util" });
  return h(
    "div",
    { class: "gpu-util" },
    h("span", { class: "label" }, "util"),
    meter,
    h("span", { class: "num" }, pct === null ? "–" : `${num(pct)} %`),
    gpu.temperature_c !== null ? h("span", { class: "dim" }, `${num(gpu.temperature_c)} °C`) : null,
    gpu.power_w !== null ? h("span", { class: "dim" }, `${num(gpu.power_w)} W`) : null,
  );
}

function running(gpu, requests) {
  if (!gpu.running_requests.length) return h("p", { class: "dim" }, "idle");
  return h(
    "ul",
    { class: "running" },
    gpu.running_requests.map((id) => {
      const request = requests.get(id);
      return h(
        "li",
        {},
        requestLink(id),
        request ? h("span", { class: "dim" }, ` ${request.model} · ${request.user}`) : null,
      );
    }),
  );
}

function actions(gpu, act) {
  const button = (verb, text) =>
    h("button", { type: "button", "data-action": verb, onclick: () => act(gpu.id, verb) }, text);
  if (gpu.cordoned) return h("div", { class: "actions" }, button("uncordon", "Uncordon"));
  return h("div", { class: "actions" }, button("cordon", "Cordon"), button("drain", "Drain"));
}

/**
 * One card per GPU. requests maps ids to the running requests the key may see; act(id, verb)
 * is given for an admin only, and adds the cordon, drain and uncordon buttons (without it the
 * cards are a user's: their own requests only).
 */
export function gpuCards(gpus, requests, act) {
  if (!gpus.length) return [h("p", { class: "dim" }, "No GPU known yet.")];
  return gpus.map((gpu) =>
    h(
      "article",
      { class: `gpu ${gpu.schedulable ? "" : "unschedulable"}`, "data-gpu": gpu.id },
      h(
        "header",
        {},
        h("strong", { class: "mono" }, gpu.id),
        h("span", { class: "dim" }, ` ${gpu.name}`),
        h(
          "span",
          { class: "badges" },
          badge(gpu.health),
          gpu.draining ? badge("draining", "cordoned") : gpu.cordoned ? badge("cordoned") : null,
        ),
      ),
      memoryBar(gpu),
      h(
        "p",
        { class: "memtext" },
        `used ${gib(gpu.memory_used_mb)} · reserved ${gib(gpu.memory_reserved_mb)} · `,
        `free ${gib(gpu.memory_free_mb)} of ${gib(gpu.memory_total_mb)} GiB`,
      ),
      utilisation(gpu),
      h(
        "p",
        { class: "slots" },
        // A user's key lists only their own requests on a GPU (the API leaves out others' ids).
        act
          ? `running ${gpu.running_requests.length} / ${gpu.slots} slots`
          : `${gpu.running_requests.length} of yours running · ${gpu.slots} slots`,
      ),
      running(gpu, requests),
      h(
        "p",
        { class: "models" },
        h("span", { class: "label" }, "loaded "),
        gpu.models_loaded.length ? gpu.models_loaded.join(", ") : "–",
        gpu.models_cached.length ? h("span", { class: "dim" }, ` (cached: ${gpu.models_cached.join(", ")})`) : null,
      ),
      act ? actions(gpu, act) : null,
    ),
  );
}
