"""The monitor in a local-steps (DiLoCo) run: it keeps counting peers and outer epochs, and stays up.

It does not hold the outer state yet (issue 17): its state averager asks the synchronous mode's prefix, where no
local-steps peer serves, so it finds no donor and holds no checkpointable state; this test pins that it says so
without failing.
"""

from __future__ import annotations

import pytest

from tests.harness import wait_until
from tests.monitor.conftest import MonitorProcess, PeerProcess

pytestmark = [pytest.mark.slow]
RUN_ID = "monitor-local-steps"
LOCAL_STEPS = ["--local_steps", "2", "--grad_compression", "none"]
MONITOR_FLAGS = ["--checkpoint_every", "2", "--fetch_state_every", "1", "--stale_after", "12", *LOCAL_STEPS]


@pytest.mark.timeout(400)
def test_the_monitor_counts_a_local_steps_swarm_and_stays_up(processes, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    monitor = MonitorProcess(workdir / "monitor", RUN_ID, MONITOR_FLAGS)
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    peers = [PeerProcess(workdir, name, RUN_ID, initial_peers, LOCAL_STEPS) for name in ("a", "b")]
    processes.extend(peers)
    wait_until(lambda: (monitor.get("/api/status") or {}).get("alive_peers") == 2, 240, "2 alive peers")
    first = monitor.get("/api/status")
    advanced = wait_until(
        lambda: (status := monitor.get("/api/status")) and status["epoch"] >= first["epoch"] + 3 and status,
        240,
        "the outer epoch to advance by 3",
    )
    assert advanced["alive_peers"] == 2 and advanced["loss"] is not None
    assert all("averaged pseudo-gradients with 2 peers" in peer.log_text() for peer in peers)
    assert monitor.process.poll() is None, monitor.log_text()[-3000:]
    assert "Traceback" not in monitor.log_text(), monitor.log_text()[-3000:]
    assert monitor.get("/healthz")
