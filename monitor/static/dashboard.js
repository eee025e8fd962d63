// Dashboard logic: polls the monitor's JSON API and draws everything with DOM + hand-made SVG (no libraries).
// Charts and cells come from charts.js; the contributors table from contributors.js.
"use strict";

const REFRESH_MS = 5000;

function renderStatus(status) {
  document.getElementById("run-id").textContent = status.run_id;
  document.getElementById("stat-epoch").textContent = status.epoch;
  document.getElementById("stat-loss").textContent = formatNumber(status.loss, 4);
  document.getElementById("stat-speed").textContent = formatNumber(status.samples_per_second);
  document.getElementById("stat-peers").textContent = status.alive_peers;
  document.getElementById("stat-samples").textContent = formatNumber(status.samples_total);
  document.getElementById("stat-invalid").textContent =
    `${status.invalid_records_total} / ${status.refused_records_total}`;
  // closed runs with --revoke-above: how many members the robust reducers' scores had revoked (details: members)
  document.getElementById("revoked-tile").hidden = !status.revoked_members;
  document.getElementById("stat-revoked").textContent = status.revoked_members || 0;
  const peersInput = document.getElementById("initial-peers");
  if (peersInput.value !== status.initial_peers_string) {
    peersInput.value = status.initial_peers_string;
    peersInput.setAttribute("value", status.initial_peers_string);  // visible in the DOM too (tests, copy)
  }
  const model = status.model || {};
  const mode = status.training_mode || {};
  document.getElementById("model-info").textContent =
    `mode ${mode.label || "?"} · model ${model.name || "?"} · fingerprint ${model.hash || "?"} · ` +
    `monitor holds the state of epoch ${status.state_epoch}`;
}

// History: the whole run once (HISTORY_POINTS evenly spread points per list), then each poll only what came since
// the newest point and epoch, so a poll stays a few KB at any age. The charts are W units wide: more points than
// that would not show, so the local copy is halved (first and last kept) whenever it doubles.
const HISTORY_POINTS = 200;
const charted = { series: [], epochs: [] };  // what the charts show, kept between polls

function historyPath() {
  const base = `/api/history?limit=${HISTORY_POINTS}`;
  if (charted.series.length === 0) return base;
  const since = charted.series[charted.series.length - 1].time;
  const epochsSince = charted.epochs.length ? charted.epochs[charted.epochs.length - 1].epoch : 0;
  return `${base}&since=${since}&epochs_since=${epochsSince}`;
}

function halved(points) {
  if (points.length <= 2 * HISTORY_POINTS) return points;
  return points.filter((_, i) => i % 2 === 0 || i === points.length - 1);
}

// Points at or after the answer's first one replace the local ones (the newest epoch's means move while it lasts).
function merged(local, fresh, key) {
  if (fresh.length === 0) return local;
  return halved(local.filter((p) => p[key] < fresh[0][key]).concat(fresh));
}

function mergeHistory(update) {
  charted.series = merged(charted.series, update.series, "time");
  charted.epochs = merged(charted.epochs, update.epochs, "epoch");
  return charted;
}

function renderHistory(history) {
  const byTime = (key) => history.series.map((p) => ({ x: p.time, y: p[key] }));
  const byEpoch = (key) => history.epochs.map((p) => ({ x: p.epoch, y: p[key] }));
  const epochLabel = (x) => `epoch ${Math.round(x)}`;
  for (const [key, name] of [["loss", "loss"], ["samples_per_second", "speed"], ["alive_peers", "peers"]]) {
    drawChart(document.getElementById(`chart-${name}-time`), byTime(key), formatTime);
    drawChart(document.getElementById(`chart-${name}-epoch`), byEpoch(key), epochLabel);
  }
}

function renderPeers(peers) {
  const body = document.querySelector("#peers-table tbody");
  body.replaceChildren();
  const now = Date.now() / 1000;
  for (const peer of peers) {
    const row = body.insertRow();
    row.className = peer.status;
    row.dataset.peerId = peer.peer_id;
    const idCell = cell(row, peer.peer_id.slice(-12));
    idCell.title = peer.peer_id;
    cell(row, peer.status);
    cell(row, peer.epoch, "num");
    cell(row, formatNumber(peer.loss, 4), "num");
    cell(row, formatNumber(peer.samples_per_second), "num");
    cell(row, formatNumber(peer.contribution), "num");
    cell(row, peer.device);
    cell(row, `${Math.max(0, Math.round(now - peer.last_seen))} s ago`, "num");
  }
}

function renderCheckpoints(checkpoints) {
  const body = document.querySelector("#checkpoints-table tbody");
  body.replaceChildren();
  for (const ckpt of checkpoints) {
    const row = body.insertRow();
    cell(row, ckpt.epoch, "num");
    cell(row, new Date(ckpt.created_at * 1000).toLocaleString());
    cell(row, formatNumber(ckpt.loss, 4), "num");
    cell(row, formatNumber(ckpt.samples_total), "num");
    cell(row, formatBytes(ckpt.size), "num");
    cell(row, ckpt.sha256.slice(0, 16) + "…").title = ckpt.sha256;
    const link = document.createElement("a");
    link.href = new URL(ckpt.url).pathname;  // relative, so it works behind a proxy too
    link.textContent = "download";
    row.insertCell().appendChild(link);
  }
}

// Robust aggregation's scores: a section of its own, shown once a reducer has scored anyone (open runs; a closed
// run's are for members, GET /api/suspects with a token).
function renderSuspects(suspects) {
  document.getElementById("suspects").hidden = suspects.length === 0;
  const body = document.querySelector("#suspects-table tbody");
  body.replaceChildren();
  for (const suspect of suspects) {
    const row = body.insertRow();
    row.className = suspect.revoked ? "suspicious revoked" : suspect.suspicious ? "suspicious" : "";
    row.dataset.peerId = suspect.peer_id;
    cell(row, suspect.peer_id.slice(-12)).title = suspect.peer_id;
    cell(row, formatNumber(suspect.suspicion), "num");
    cell(row, suspect.reporters, "num");
    cell(row, suspect.revoked ? "revoked" : suspect.suspicious ? "suspicious" : "ok");
    const contributorCell = row.insertCell();  // closed runs: the member's row of the contributors table
    if (suspect.contributor) {
      const link = document.createElement("a");
      link.href = `/contributor?id=${encodeURIComponent(suspect.contributor)}`;
      link.textContent = suspect.contributor;
      contributorCell.appendChild(link);
    } else {
      contributorCell.textContent = "–";
    }
  }
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// A closed run serves charts, peers and checkpoints to members only (an access token): the public page shows the
// summary tiles and says so where the rest would be, instead of failing on 401.
function showMembersOnly() {
  const note = "members only (closed run)";
  for (const chart of document.querySelectorAll(".chart")) {
    const text = document.createElement("p");
    text.className = "members-only muted";
    text.textContent = note;
    chart.replaceChildren(text);
  }
  for (const table of document.querySelectorAll("#peers-table, #checkpoints-table, #contributors-table, #suspects-table")) {
    const body = table.querySelector("tbody");
    body.replaceChildren();
    const row = body.insertRow();
    const td = cell(row, note, "members-only muted");
    td.colSpan = table.querySelectorAll("thead th").length;
  }
}

async function refreshMemberData() {
  const [history, peers, checkpoints, contributors] = await Promise.all(
    [historyPath(), "/api/peers", "/api/checkpoints", "/api/contributors"].map(getJson));
  renderHistory(mergeHistory(history));
  renderPeers(peers);
  renderCheckpoints(checkpoints);
  renderContributors(contributors);
  renderSuspects(await getJson("/api/suspects"));
}

async function refresh() {
  const badge = document.getElementById("connection");
  try {
    const status = await getJson("/api/status");
    renderStatus(status);
    if (status.closed_run) showMembersOnly();
    else await refreshMemberData();
    badge.textContent = `updated ${new Date().toLocaleTimeString()}`;
    badge.className = "badge ok";
  } catch (error) {
    badge.textContent = `monitor unreachable (${error.message})`;
    badge.className = "badge down";
  } finally {
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }
}

document.getElementById("copy-peers").addEventListener("click", () => {
  const input = document.getElementById("initial-peers");
  input.select();
  if (navigator.clipboard) navigator.clipboard.writeText(input.value).catch(() => document.execCommand("copy"));
  else document.execCommand("copy");
});
document.getElementById("refresh-seconds").textContent = REFRESH_MS / 1000;
refresh();
setInterval(refresh, REFRESH_MS);
