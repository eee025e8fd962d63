"""The chaos harness itself: links really get slower, later and lossy, partitions cut and heal, cleanup is complete."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.chaos.netns import Network, network_prefix
from tests.chaos.processes import ChaosProcess
from tests.harness import REPO, child_env, wait_until

PORT = 5555


@pytest.fixture
def pair(network_supported, tmp_path):
    """Two nodes on a fresh network, a probe server on the second; all removed afterwards (and checked)."""
    network = Network(f"{network_prefix()}t")
    server = None
    try:
        client, target = network.add_node("x"), network.add_node("y")
        server = ChaosProcess(
            target, "probe", [sys.executable, "-m", "tests.chaos.probe", "serve", str(PORT)], tmp_path
        )
        wait_until(lambda: "probe listening" in server.log_text(), 30, "the probe server")
        yield network, client, target, tmp_path
    finally:
        processes = [server, *getattr(network, "extra_processes", [])]
        for process in filter(None, processes):
            process.stop(timeout=5)
        network.close()
    assert not network.leftovers(), network.leftovers()
    assert not any(process.leftovers() for process in filter(None, processes))


def measure(client, target, timeout: float = 60) -> dict:
    command = [*client.exec_prefix(), sys.executable, "-m", "tests.chaos.probe", "measure", target.address, str(PORT)]
    result = subprocess.run(
        command, check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_relay_adds_latency_tbf_limits_rate_and_loss_rules_drop(pair):
    network, client, target, tmp_path = pair
    plain = measure(client, target)
    assert plain["rtt_ms"] < 20, plain
    from tests.chaos.processes import Relay

    network.extra_processes = [Relay(client, tmp_path, port=4000, delay_ms=25)]
    client.limit_rate(20)
    client.drop_randomly(0.01)
    shaped = measure(client, target)
    print(f"plain link {plain}, straggler link {shaped}")
    assert 50 <= shaped["rtt_ms"] < 150, shaped  # 25 ms each way through the relay
    assert 5 < shaped["mbit"] < 21, shaped  # tbf at 20 Mbit/s (TCP over 50 ms and 1% loss gets less)
    counters = client.ns("iptables", "-L", "OUTPUT", "-v", "-x", "-n").stdout
    dropped = [int(line.split()[0]) for line in counters.splitlines() if "statistic" in line]
    assert dropped and dropped[0] > 0, counters  # ~1% of the ~3000 packets of the 2 MB upload


def test_partition_cuts_the_link_and_healing_restores_it(pair):
    _, client, target, _ = pair
    target.partition()
    with pytest.raises((subprocess.TimeoutExpired, AssertionError)):
        measure(client, target, timeout=8)
    target.heal()
    assert measure(client, target)["rtt_ms"] < 20


def test_network_close_removes_namespaces_and_links(network_supported):
    network = Network(f"{network_prefix()}u")
    try:
        for name in ("p", "q"):
            network.add_node(name).limit_rate(5)
        assert len(network.leftovers()) >= 5  # two namespaces, two veth ends, the bridge
    finally:
        network.close()
    assert network.leftovers() == []
