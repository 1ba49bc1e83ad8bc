// Line charts drawn as inline SVG from the samples the page keeps.

import { h, s } from "./dom.js";

const WIDTH = 460;
const HEIGHT = 150;
const PAD = { left: 44, right: 8, top: 10, bottom: 22 };

/** A rounded axis maximum at or above the largest value (1, 2, 5 × 10^n). */
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function label(value) {
  if (Number.isInteger(value)) return String(value);
  return value >= 100 ? value.toFixed(0) : value >= 1 ? value.toFixed(1) : value.toFixed(2);
}

/**
 * A chart of samples over time.
 *
 * samples: [{t: ms since epoch, values: {series name: number | null}}], oldest first.
 * series: [{name, cls}] (cls colours the line). The x axis spans the samples kept, from 30 s
 * up to maxWindowS.
 */
export function lineChart(title, unit, series, samples, maxWindowS) {
  const now = samples.length ? samples[samples.length - 1].t : Date.now();
  const kept = samples.length ? (now - samples[0].t) / 1000 : 0;
  const windowS = Math.min(maxWindowS, Math.max(30, Math.ceil(kept / 30) * 30));
  const max = niceMax(
    Math.max(0, ...samples.flatMap((p) => series.map((line) => p.values[line.name] ?? 0))),
  );
  const x = (t) => PAD.left + ((t - (now - windowS * 1000)) / (windowS * 1000)) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => PAD.top + (1 - v / max) * (HEIGHT - PAD.top - PAD.bottom);
  const svg = s("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: "chart",
    role: "img",
    "aria-label": title,
  });
  for (const v of [0, max / 2, max]) {
    svg.append(
      s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(v), y2: y(v), class: "grid" }),
      s("text", { x: PAD.left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, label(v)),
    );
  }
  svg.append(
    s("text", { x: PAD.left, y: HEIGHT - 4, class: "tick" }, `−${windowS} s`),
    s("text", { x: WIDTH - PAD.right, y: HEIGHT - 4, class: "tick", "text-anchor": "end" }, "now"),
  );
  for (const line of series) {
    const points = samples
      .filter((p) => p.values[line.name] !== null && p.values[line.name] !== undefined)
      .map((p) => `${x(p.t).toFixed(1)},${y(p.values[line.name]).toFixed(1)}`);
    if (points.length) svg.append(s("polyline", { points: points.join(" "), class: `line ${line.cls}` }));
  }
  const latest = samples.length ? samples[samples.length - 1].values : {};
  const legend = h(
    "div",
    { class: "legend" },
    series.map((line) =>
      h(
        "span",
        { class: `key ${line.cls}` },
        `${line.name} ${latest[line.name] === null || latest[line.name] === undefined ? "–" : label(latest[line.name])} ${unit}`,
      ),
    ),
  );
  return h("figure", { class: "chart-box" }, h("figcaption", {}, title), svg, legend);
}
