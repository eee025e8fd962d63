"""Re-bootstrapping a DHT that lost its routing table (as after a network cut), with real DHTs on 127.0.0.1.

The full scenario (a peer cut off by iptables rejoins after healing) is tests/chaos/test_chaos_faults.py.
"""

from __future__ import annotations

import time

import hivemind
import pytest

from peer.hivemind_gaps.rejoin import Rejoiner


async def forget_everyone(_dht, node) -> int:
    """What a long cut does to a routing table: every peer evicted. Returns how many there were."""
    table = node.protocol.routing_table
    known = list(table.uid_to_peer_id)
    for node_id in known:
        del table[node_id]
    return len(known)


async def table_size(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


def poll_until_collected(rejoiner: Rejoiner, num_peers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while rejoiner.pending is not None or rejoiner.attempts == 0:
        assert time.monotonic() < deadline, "the re-bootstrap did not finish"
        rejoiner.check(num_peers)
        time.sleep(0.1)


@pytest.fixture
def two_dhts():
    first = hivemind.DHT(start=True)
    second = hivemind.DHT(start=True, initial_peers=[str(m) for m in first.get_visible_maddrs()])
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.mark.timeout(60)
def test_a_peer_alone_too_long_refills_its_routing_table_from_the_initial_peers(two_dhts):
    first, second = two_dhts
    assert second.run_coroutine(forget_everyone) == 1
    assert first.run_coroutine(forget_everyone) == 1
    rejoiner = Rejoiner(second, patience=0.0, timeout=5.0)
    poll_until_collected(rejoiner, num_peers=1, timeout=30)
    assert rejoiner.last_result.responded == 1 and rejoiner.last_result.table_before == 0
    assert second.run_coroutine(table_size) == 1
    assert first.run_coroutine(table_size) == 1  # the ping also put the rejoining peer back into the other's table


@pytest.mark.timeout(60)
def test_no_attempt_while_other_peers_are_seen_or_before_the_patience_ran_out(two_dhts):
    first, second = two_dhts
    rejoiner = Rejoiner(second, patience=30.0)
    for num_peers in (2, 1, 1, 3, 1):
        rejoiner.check(num_peers)
    assert rejoiner.attempts == 0 and rejoiner.pending is None
    lonely = Rejoiner(first, patience=0.0)  # started without initial peers
    lonely.check(1)
    assert lonely.attempts == 0  # the swarm's first node has nobody to dial
