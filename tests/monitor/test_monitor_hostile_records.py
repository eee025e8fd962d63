"""A real monitor under attack: a hostile process writes forged, oversized, malformed and out-of-bounds progress
records into its DHT. Each is refused and counted by reason (API, metrics, log), and the monitor keeps aggregating
the honest peer's records: it never dies (also when restarted while the records live), no ghost stays alive, and the
run's epoch is not hijacked. A monitor whose refreshes are stuck says so: /healthz answers 503 with the age."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import hivemind
import pytest
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from peer.swarm.progress import PROTOCOL_VERSION, ProgressRecord, local_public_key, make_validators, publish_progress
from tests.harness import wait_until
from tests.monitor.conftest import MonitorProcess
from tests.peer.hostile_peer import LingeringHostilePeer, run_hostile_peer

pytestmark = [pytest.mark.slow]
RUN_ID = "hostile-monitor-test"


def honest_record(epoch: int, model_hash: str) -> ProgressRecord:
    return ProgressRecord(
        epoch=epoch,
        samples_per_second=5.0,
        samples_accumulated=32,
        loss_sum=20.0,
        mini_steps=4,
        device="cpu",
        version="dev",
        time=float(get_dht_time()),
        model_hash=model_hash,
        protocol=PROTOCOL_VERSION,
    )


def invalid_records_metric(monitor: MonitorProcess) -> float:
    families = text_string_to_metric_families(monitor.get("/metrics").decode())
    return next(s.value for f in families for s in f.samples if s.name == "albert_monitor_invalid_records_total")


def refusals_by_reason_metric(monitor: MonitorProcess) -> dict[str, float]:
    families = text_string_to_metric_families(monitor.get("/metrics").decode())
    name = "albert_monitor_invalid_records_by_reason_total"
    return {s.labels["reason"]: s.value for f in families for s in f.samples if s.name == name}


class HonestPublisher:
    """An honest peer's DHT republishing its record (fresh time) every second from a thread, until stopped."""

    def __init__(self, initial_peers: list[str], model_hash: str, epoch: int = 1):
        self.dht = hivemind.DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=initial_peers,
            record_validators=make_validators(RUN_ID),
        )
        self.model_hash, self.epoch = model_hash, epoch
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            publish_progress(self.dht, RUN_ID, honest_record(self.epoch, self.model_hash), expiration=30)
            self.stopped.wait(1.0)

    def maddrs(self) -> list[str]:
        return [str(maddr) for maddr in self.dht.get_visible_maddrs()]

    def stop_publishing(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)

    def shutdown(self) -> None:
        self.stop_publishing()
        self.dht.shutdown()


def assert_unharmed(monitor: MonitorProcess) -> dict:
    """The monitor is up and healthy, aggregates the honest peer alone at its epoch, with finite sums, no failures."""
    status = monitor.get("/api/status")
    assert monitor.process.poll() is None, monitor.log_text()[-3000:]
    assert monitor.get("/healthz")["status"] == "ok"
    assert status["refresh_errors"] == 0, monitor.log_text()[-3000:]
    assert status["epoch"] == 1  # neither epoch 2**62 nor the unvouched epoch 10**6
    assert status["alive_peers"] == 1  # the honest peer; no ghost, no unvouched peer
    assert status["loss"] == 5.0 and status["samples_per_second"] == 5.0  # the honest record's, not inf (null)
    assert math.isfinite(status["samples_total"]) and status["samples_total"] < 2**53
    return status


@pytest.mark.timeout(400)
def test_hostile_records_are_refused_counted_and_the_monitor_keeps_working(processes, tmp_path):
    monitor = MonitorProcess(tmp_path / "monitor", RUN_ID, ["--stale_after", "300"])
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    model_hash = monitor.get("/api/status")["model"]["hash"]
    honest = hivemind.DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=initial_peers,
        record_validators=make_validators(RUN_ID),
    )
    try:
        assert publish_progress(honest, RUN_ID, honest_record(1, model_hash), expiration=120)
        wait_until(lambda: monitor.get("/api/status")["epoch"] == 1, 60, "the honest record to be aggregated")
        assert monitor.get("/api/status")["invalid_records_total"] == 0  # honest records are never counted

        stored = run_hostile_peer(initial_peers, RUN_ID, local_public_key(), tmp_path, flood=3)

        assert not any(stored.values()), stored
        wait_until(lambda: monitor.get("/api/status")["invalid_records_total"] >= 5, 60, "5 refused records counted")
        status = monitor.get("/api/status")
        assert invalid_records_metric(monitor) == status["invalid_records_total"]
        refusals = [line for line in monitor.log_text().splitlines() if "invalid DHT records since the last" in line]
        assert all(any(f" {reason}" in line for line in refusals) for reason in ("signature", "size", "schema"))
        # the forged record did not replace the honest one, and the monitor goes on aggregating it
        assert status["epoch"] == 1  # not the forged record's epoch
        assert publish_progress(honest, RUN_ID, honest_record(2, model_hash), expiration=120)
        wait_until(lambda: monitor.get("/api/status")["epoch"] == 2, 60, "the next honest record")
        assert monitor.get("/api/status")["alive_peers"] == 1
        assert monitor.get("/healthz")["status"] == "ok" and monitor.process.poll() is None
    finally:
        honest.shutdown()


@pytest.mark.timeout(500)
def test_out_of_bounds_records_never_crash_poison_or_haunt_the_monitor(processes, tmp_path):
    flags = ["--stale_after", "5", "--fetch_state_every", "0", "--checkpoint_every", "0"]
    monitor = MonitorProcess(tmp_path / "monitor", RUN_ID, flags)
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    model_hash = monitor.get("/api/status")["model"]["hash"]
    honest = HonestPublisher(initial_peers, model_hash)
    hostile = None
    try:
        wait_until(lambda: monitor.get("/api/status")["alive_peers"] == 1, 60, "the honest record to be aggregated")

        hostile = LingeringHostilePeer(initial_peers, RUN_ID, model_hash, tmp_path)
        stored = hostile.stored()
        assert set(stored) == {"samples", "future", "epoch-huge", "epoch-ahead", "loss", "speed", "protocol"}

        def refused_all_kinds():
            status = monitor.get("/api/status")
            reasons = status["invalid_records_by_reason"]
            protocol = [why for why in status["refused_peers"].values() if "protocol version" in why]
            return all(reasons.get(kind) for kind in ("range", "future", "epoch")) and protocol and status

        status = wait_until(refused_all_kinds, 60, "range, future and epoch refusals and a refused protocol")
        why = next(why for why in status["refused_peers"].values() if "protocol version" in why)
        assert f"protocol version {PROTOCOL_VERSION + 1} differs from the run's {PROTOCOL_VERSION}" in why
        time.sleep(8)  # more than --stale-after: several refreshes with every hostile record in the DHT
        before = assert_unharmed(monitor)
        metric = refusals_by_reason_metric(monitor)
        assert all(metric.get(kind, 0) >= 1 for kind in ("range", "future", "epoch")), metric
        log = monitor.log_text()
        assert "Traceback" not in log and "OverflowError" not in log
        assert f"protocol version {PROTOCOL_VERSION + 1} differs" in log

        # a restart while the records live in the DHT (served by the hostile and the honest peers' nodes)
        assert monitor.stop() == 0
        restarted = MonitorProcess(
            monitor.workdir,
            RUN_ID,
            [*flags, "--initial_peers", *honest.maddrs()],
            dht_port=monitor.dht_port,
            http_port=monitor.http_port,
            name="monitor-restarted",
        )
        processes.append(restarted)
        restarted.wait_ready()
        wait_until(lambda: restarted.get("/api/status")["alive_peers"] == 1, 60, "the honest record after the restart")
        # hivemind drops a node's whole dictionary when one of its subkeys is invalid, so which hostile records
        # reach the restarted monitor depends on the nodes that answer: some are, and each is refused
        wait_until(
            lambda: sum(restarted.get("/api/status")["invalid_records_by_reason"].values()) >= 3,
            60,
            "hostile records refused again after the restart",
        )
        time.sleep(8)
        after = assert_unharmed(restarted)
        assert after["samples_total"] >= before["samples_total"]  # its history went on, unharmed

        # no ghost: once the honest peer stops, nobody stays alive past --stale-after, though the future-dated
        # record (an hour ahead) lives on in the hostile peer's node
        honest.stop_publishing()
        stopped = time.monotonic()
        wait_until(lambda: restarted.get("/api/status")["alive_peers"] == 0, 20, "the honest peer to go stale")
        assert time.monotonic() - stopped < 5 + 1 + 5  # stale-after + a refresh + slack
        time.sleep(3)
        status = restarted.get("/api/status")
        assert status["alive_peers"] == 0 and status["epoch"] == 1 and status["refresh_errors"] == 0
        assert restarted.process.poll() is None
    finally:
        if hostile is not None:
            hostile.stop()
        honest.shutdown()


def python_children(pid: int) -> list[int]:
    """The monitor's forked helper processes (its DHT and averager), not p2pd."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if "p2pd" not in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                children.append(int(child))
    return children


@pytest.mark.timeout(300)
def test_a_stuck_refresh_turns_healthz_503_with_its_age_and_back(processes, tmp_path):
    monitor = MonitorProcess(tmp_path / "monitor-stuck", RUN_ID + "-stuck")
    processes.append(monitor)
    monitor.wait_ready()
    helpers = python_children(monitor.process.pid)
    assert helpers, "the monitor has no DHT process"
    for pid in helpers:  # the DHT stops answering: the refresh waits on it, and no refresh succeeds
        os.kill(pid, signal.SIGSTOP)
    try:
        # 3 refresh periods (1 s) + the grace of one state download (--load_state_timeout 15)
        health = wait_until(lambda: monitor.get("/healthz") is None, 60, "/healthz to fail")
        assert health
        request = urllib.request.Request(monitor.url + "/healthz")
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        body = json.loads(answer.value.read())
        assert answer.value.code == 503 and body["status"] == "stale" and body["last_refresh_age_seconds"] > 18
    finally:
        for pid in helpers:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: (monitor.get("/healthz") or {}).get("status") == "ok", 60, "/healthz to recover")
    assert monitor.process.poll() is None
