"""Stopping a peer while its averaging partner hangs: it still saves its state and leaves before the deadline.

hivemind waits for a background averaging round (matchmaking retries included) up to its timeout, and the next
optimizer step queues behind it; a stopped peer must not wait for a group of peers that are frozen or leaving too.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.harness import process_group_members, wait_until

pytestmark = [pytest.mark.slow]
# longer than the stop deadline (12 s), so that a stop waiting for a round to time out would show
SLOW_ROUNDS = ["--averaging_timeout", "40"]


@pytest.mark.timeout(300)
def test_sigterm_while_the_partner_is_frozen_saves_a_backup_in_time(make_swarm):
    swarm = make_swarm()
    leaving, frozen = swarm.start_peer("leaving", SLOW_ROUNDS), swarm.start_peer("frozen", SLOW_ROUNDS)
    swarm.wait_for_epoch(3, peers=2, timeout=180)
    wait_until(lambda: "Averaged parameters with 2 peers" in leaving.log_text(), 120, "a joint state averaging round")
    frozen.signal_group(signal.SIGSTOP)  # a hung machine: its averaging rounds neither finish nor fail
    try:
        frozen_at = len(leaving.log_text())
        # the leaving peer reaches its next optimizer step, whose averaging now waits for the frozen partner
        wait_until(lambda: "Beginning optimizer step" in leaving.log_text()[frozen_at:], 120, "the next step")
        time.sleep(3)
        signalled_at = time.monotonic()
        leaving.process.send_signal(signal.SIGTERM)
        code = leaving.process.wait(timeout=60)
        elapsed = time.monotonic() - signalled_at
    finally:
        frozen.signal_group(signal.SIGCONT)
    after_stop = leaving.log_text().split("Received SIGTERM")[-1]
    assert "Shutdown did not finish in time" not in after_stop, after_stop[:3000]
    assert "Backup of epoch" in after_stop, after_stop[:3000]
    assert code == 128 + signal.SIGTERM
    assert elapsed < 12, f"took {elapsed:.1f} s to stop"
    wait_until(lambda: not process_group_members(leaving.pgid), 10, "the peer's p2pd and children to exit")
