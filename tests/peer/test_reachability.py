"""After joining, a node learns whether the swarm can reach it: a swarm peer dials it back (real DHTs and p2pds).

Reachable: a node listening on loopback. Unreachable: a node announcing a port nobody listens on (what a peer behind
NAT announces). The helper's refusals are tested as an attacker sends them: a second request too soon, an oversized
length prefix, a request that is not the expected JSON.
"""

from __future__ import annotations

import json
import logging
import sys

import hivemind
import pytest
from hivemind.p2p import PeerID

from peer.swarm.config import SwarmConfig
from peer.swarm.dht import build_dht
from peer.swarm.reachability import HANDLER, check_reachability, describe, read_message
from tests.harness import LOOPBACK, GroupProcess, free_port, wait_until

LOOPBACK_ANY = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture(scope="module")
def helper():
    """The node every test asks: it serves the dial-back RPC as every node does (build_dht registers it)."""
    dht = build_dht(SwarmConfig(host_maddrs=LOOPBACK_ANY))
    yield dht
    dht.shutdown()


def join(helper: hivemind.DHT, **settings) -> tuple[hivemind.DHT, SwarmConfig]:
    swarm = SwarmConfig(host_maddrs=LOOPBACK_ANY, initial_peers=[str(helper.get_visible_maddrs()[0])], **settings)
    return build_dht(swarm), swarm


def test_a_node_on_loopback_is_dialled_back(helper):
    dht, swarm = join(helper)
    try:
        result = check_reachability(dht, swarm)
        port = int(dht.get_visible_maddrs()[0]["tcp"])
    finally:
        dht.shutdown()
    assert result.helper == str(helper.peer_id) and result.reachable == [f"/ip4/127.0.0.1/tcp/{port}"]
    level, line = describe(result)
    assert level == logging.INFO and line.startswith(f"Reachable from the swarm: peer {helper.peer_id} dialled")


def test_a_node_announcing_a_dead_port_is_told_the_fix(helper):
    dead = free_port()
    dht, swarm = join(helper, announce_maddrs=[f"/ip4/127.0.0.1/tcp/{dead}"])
    try:
        result = check_reachability(dht, swarm)
    finally:
        dht.shutdown()
    assert result.reachable == [] and result.results[0]["maddr"] == f"/ip4/127.0.0.1/tcp/{dead}"
    level, line = describe(result)
    assert level == logging.WARNING and "\n" not in line
    assert line.startswith("Not reachable from the swarm") and "no connection to this peer id" in line
    assert f"forward TCP port {dead}" in line and f"--announce-maddrs /ip4/127.0.0.1/tcp/{dead}" in line
    assert "--client-mode" in line


class RawRequest:
    """Picklable for run_coroutine: send ``payload`` as is on the dial-back protocol to ``helper_id``, read the answer
    (runs in the asker's DHT process)."""

    def __init__(self, helper_id: str, payload: bytes):
        self.helper_id, self.payload = helper_id, payload

    async def __call__(self, dht, node) -> dict:
        _, reader, writer = await node.p2p.call_binary_stream_handler(PeerID.from_base58(self.helper_id), HANDLER)
        try:
            writer.write(self.payload)
            await writer.drain()
            return await read_message(reader)
        finally:
            writer.close()


def json_request(helper_id: str, message: dict) -> RawRequest:
    data = json.dumps(message).encode()
    return RawRequest(helper_id, len(data).to_bytes(4, "big") + data)


def test_the_helper_refuses_abuse_and_keeps_serving(helper):
    attacker, _ = join(helper)
    helper_id = str(helper.peer_id)
    try:
        oversized = attacker.run_coroutine(RawRequest(helper_id, (10**9).to_bytes(4, "big") + b"{}"))
        not_json = attacker.run_coroutine(RawRequest(helper_id, (5).to_bytes(4, "big") + b"hello"))
        no_ports = attacker.run_coroutine(json_request(helper_id, {"ports": "all"}))
        elsewhere = attacker.run_coroutine(json_request(helper_id, {"ports": [free_port()], "host": "/ip4/10.9.9.9"}))
        again = attacker.run_coroutine(json_request(helper_id, {"ports": [free_port()]}))
    finally:
        attacker.shutdown()
    assert "exceeds 4096" in oversized["refused"] and "bad request" in not_json["refused"]
    assert "ports must be" in no_ports["refused"]
    # the helper dials only the address the request came from, whatever the request names
    assert [r["maddr"].rsplit("/", 2)[0] for r in elsewhere["results"]] == ["/ip4/127.0.0.1"]
    assert "one dial-back per peer every 60 s" in again["refused"]
    # and it still serves an honest newcomer
    dht, swarm = join(helper)
    try:
        assert check_reachability(dht, swarm).reachable
    finally:
        dht.shutdown()


@pytest.mark.slow
def test_albert_peer_logs_that_the_swarm_cannot_reach_it(tmp_path):
    first_port, dead = free_port(), free_port()
    base = [sys.executable, "-m", "peer", "--run_id", "reach", "--torch_threads", "1", "--max_length", "32"]
    first = GroupProcess("first", [*base, "--host_maddrs", f"/ip4/127.0.0.1/tcp/{first_port}", "--backup_dir",
                                   str(tmp_path / "first")], tmp_path / "first.log")  # fmt: skip
    hidden = None
    try:
        wait_until(lambda: "Joined run" in first.log_text(), 300, "the first peer")
        address = next(
            word for word in first.log_text().split() if word.startswith(f"/ip4/127.0.0.1/tcp/{first_port}")
        )
        hidden = GroupProcess("hidden", [*base, *LOOPBACK, "--announce_maddrs", f"/ip4/127.0.0.1/tcp/{dead}",
                                         "--initial_peers", address, "--backup_dir", str(tmp_path / "hidden")],
                              tmp_path / "hidden.log")  # fmt: skip
        wait_until(lambda: "reachable from the swarm" in hidden.log_text().lower(), 300, "the reachability line")
        log = hidden.log_text()
    finally:
        for process in (hidden, first):
            if process is not None:
                process.stop()
    line = next(line for line in log.splitlines() if "reachable from the swarm" in line.lower())
    assert " WARN" in line and "Not reachable from the swarm" in line and f"forward TCP port {dead}" in line
    assert "Could not check whether the swarm can reach this peer: no other peer is connected yet" in (
        first.log_text()
    )
