// The dashboard's contributors table: sortable by any column (click its header; again to reverse).
// Names are chosen by the peers themselves: they go in as text (cell() uses textContent), never as HTML.
"use strict";

const contributorSort = { key: "samples", descending: true };
let lastContributors = [];

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function formatMoment(seconds) {
  return new Date(seconds * 1000).toLocaleString();
}

// A closed run's robust reducers' view of a member ("–" where unscored, and always in an open run).
function formatSuspicion(contributor) {
  if (contributor.suspicion === null || contributor.suspicion === undefined) return "–";
  return `${formatNumber(contributor.suspicion)} ${contributor.verdict}`;
}

function compareContributors(a, b) {
  // unscored rows (null suspicion) sort below every scored one
  const [x, y] = [a[contributorSort.key] ?? -Infinity, b[contributorSort.key] ?? -Infinity];
  const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
  return (contributorSort.descending ? -order : order) || a.peer_id.localeCompare(b.peer_id);
}

function renderContributors(contributors) {
  lastContributors = contributors;
  const table = document.getElementById("contributors-table");
  table.dataset.sortKey = contributorSort.key;
  table.dataset.sortOrder = contributorSort.descending ? "descending" : "ascending";
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const contributor of [...contributors].sort(compareContributors)) {
    const row = body.insertRow();
    row.className = ["suspicious", "revoked"].includes(contributor.verdict)
      ? `${contributor.status} suspicious`
      : contributor.status;
    row.dataset.peerId = contributor.peer_id;
    const link = document.createElement("a");
    link.href = `/contributor?id=${encodeURIComponent(contributor.peer_id)}`;
    link.textContent = contributor.name || "(no name)";
    const nameCell = row.insertCell();
    nameCell.className = "contributor-name";
    nameCell.appendChild(link);
    cell(row, contributor.peer_id, "peer-id");
    cell(row, contributor.samples, "num samples");
    cell(row, formatDuration(contributor.compute_seconds), "num");
    cell(row, formatDuration(contributor.uptime_seconds), "num");
    cell(row, formatMoment(contributor.first_seen));
    cell(row, formatMoment(contributor.last_seen));
    cell(row, contributor.device);
    cell(row, contributor.status);
    cell(row, formatSuspicion(contributor), "num suspicion");
  }
}

for (const header of document.querySelectorAll("#contributors-table th[data-key]")) {
  header.addEventListener("click", () => {
    const key = header.dataset.key;
    contributorSort.descending = contributorSort.key === key ? !contributorSort.descending : true;
    contributorSort.key = key;
    renderContributors(lastContributors);
  });
}
