// Building DOM nodes and formatting numbers. Nodes are made with createElement and text nodes
// only (never innerHTML), so nothing a request carries can become markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("td", {class: "num"}, "42"). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Replace the children of the element with this id. */
export function fill(id, ...children) {
  const shown = children.flat().filter((child) => child !== null && child !== undefined && child !== false);
  document.getElementById(id).replaceChildren(...shown);
}

/** MiB as a short GiB figure: 81559 → "79.6". */
export function gib(mib) {
  return (mib / 1024).toFixed(mib >= 10240 ? 0 : 1);
}

/** Seconds as a short duration: 0.42 → "0.42 s", 95 → "1m 35s". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 10) return `${seconds.toFixed(2)} s`;
  if (seconds < 120) return `${seconds.toFixed(0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 120) return `${minutes}m ${Math.floor(seconds % 60)}s`;
  return `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

/** Seconds since an ISO 8601 time. */
export function ageOf(iso, now = Date.now()) {
  return iso ? Math.max(0, (now - Date.parse(iso)) / 1000) : null;
}

/** A number or an en dash when absent. */
export function num(value, digits = 0) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

/** A status or health word as a coloured badge. */
export function badge(word, kind = word) {
  return h("span", { class: `badge ${kind}` }, word);
}
