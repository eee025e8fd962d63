// Drawing helpers shared by the dashboard and the contributor page: numbers, table cells, hand-made SVG charts.
// Every text from the monitor goes in through textContent or setAttribute, never as HTML: peers choose their names.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const W = 400, H = 160, PAD = { left: 44, right: 8, top: 8, bottom: 20 };

function svgElement(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

function formatNumber(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1e6) return (value / 1e6).toFixed(2) + "M";
  if (Math.abs(value) >= 1e4) return (value / 1e3).toFixed(1) + "k";
  return Number.isInteger(value) ? String(value) : value.toPrecision(digits);
}

function formatBytes(size) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) { size /= 1024; unit += 1; }
  return `${size.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function formatTime(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// Draw one line chart of points [{x, y}] into the container; x labels come from formatX.
function drawChart(container, points, formatX) {
  const svg = svgElement("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  const usable = points.filter((p) => p.y !== null && Number.isFinite(p.y));
  svg.dataset.points = String(usable.length);
  if (usable.length === 0) {
    const attrs = { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" };
    svg.appendChild(svgElement("text", attrs, "no data yet"));
    container.replaceChildren(svg);
    return;
  }
  const xs = usable.map((p) => p.x), ys = usable.map((p) => p.y);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.appendChild(svgElement("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(y), y2: sy(y), class: "grid" }));
    svg.appendChild(svgElement("text", { x: PAD.left - 4, y: sy(y) + 3, "text-anchor": "end" }, formatNumber(y)));
  }
  svg.appendChild(svgElement("text", { x: PAD.left, y: H - 4 }, formatX(x0)));
  svg.appendChild(svgElement("text", { x: W - PAD.right, y: H - 4, "text-anchor": "end" }, formatX(x1)));
  const path = usable.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
  svg.appendChild(svgElement("path", { d: path, class: "series" }));
  if (usable.length === 1) {
    svg.appendChild(svgElement("circle", { cx: sx(xs[0]), cy: sy(ys[0]), r: 3, class: "series" }));
  }
  container.replaceChildren(svg);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}
