"""A real monitor under attack: a hostile process writes forged, oversized and malformed progress records into its
DHT. Each is refused and counted (API, metrics, log), and the monitor keeps aggregating the honest peer's records."""

from __future__ import annotations

import hivemind
import pytest
from hivemind.utils import get_dht_time
from prometheus_client.parser import text_string_to_metric_families

from peer.progress import PeerProgress, local_public_key, make_validators, publish_progress
from tests.monitor.conftest import MonitorProcess, wait_until
from tests.peer.hostile_peer import run_hostile_peer

pytestmark = [pytest.mark.slow]
RUN_ID = "hostile-monitor-test"


def honest_record(epoch: int, model_hash: str) -> PeerProgress:
    return PeerProgress(
        epoch=epoch,
        samples_per_second=5.0,
        samples_accumulated=32,
        loss_sum=20.0,
        mini_steps=4,
        device="cpu",
        version="dev",
        time=float(get_dht_time()),
        model_hash=model_hash,
    )


def invalid_records_metric(monitor: MonitorProcess) -> float:
    families = text_string_to_metric_families(monitor.get("/metrics").decode())
    return next(s.value for f in families for s in f.samples if s.name == "albert_monitor_invalid_records_total")


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
