// One contributor's page: its row of the contributors table and the history of its records, from
// /api/contributors/{id}. Its name is the peer's own choice: shown through textContent only.
"use strict";

async function showContributor() {
  const id = new URLSearchParams(window.location.search).get("id") || "";
  document.getElementById("contributor-id").textContent = id;
  const badge = document.getElementById("connection");
  try {
    const response = await fetch(`/api/contributors/${encodeURIComponent(id)}`, { cache: "no-store" });
    if (response.status === 401) throw new Error("members only: this run is closed");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const { contributor, points } = await response.json();
    document.getElementById("contributor-name").textContent = contributor.name || "(no name)";
    document.getElementById("stat-samples").textContent = contributor.samples;
    document.getElementById("stat-compute").textContent = formatDuration(contributor.compute_seconds);
    document.getElementById("stat-uptime").textContent = formatDuration(contributor.uptime_seconds);
    document.getElementById("stat-status").textContent = contributor.status;
    document.getElementById("stat-device").textContent = contributor.device;
    for (const [key, chart] of [["loss", "loss"], ["samples_per_second", "speed"], ["samples", "samples"]]) {
      const series = points.map((point) => ({ x: point.time, y: point[key] }));
      drawChart(document.getElementById(`chart-${chart}`), series, formatTime);
    }
    badge.textContent = `updated ${new Date().toLocaleTimeString()}`;
    badge.className = "badge ok";
  } catch (error) {
    badge.textContent = `no data (${error.message})`;
    badge.className = "badge down";
  }
}

showContributor();
setInterval(showContributor, 5000);
