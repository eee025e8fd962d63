"""Rejoining the swarm after a network cut: a peer that sees no other peer for a while re-bootstraps its DHT.

hivemind 1.1.12 dials ``initial_peers`` only when the DHT starts. A cut longer than the DHT's request timeouts makes
both sides evict each other from their routing tables, and nothing dials again after the link heals: the cut-off peer
would train alone forever. ``Rejoiner`` pings the initial peers again (which puts them, and this peer, back into each
other's routing tables) and looks up this node's own id to refill its table, as the DHT's bootstrap does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebootstrapResult:
    """What one re-bootstrap achieved (sent back from the DHT process)."""

    initial_peers: int
    responded: int
    table_before: int
    table_after: int

    def __str__(self) -> str:
        return (
            f"{self.responded}/{self.initial_peers} initial peers answered; "
            f"routing table {self.table_before} -> {self.table_after} peers"
        )


async def rebootstrap(
    _dht: hivemind.DHT, node: DHTNode, initial_peers: list[str], timeout: float
) -> RebootstrapResult:
    """Runs inside the DHT process: ping every initial peer, then look up our own id to refill the routing table.

    Each stage is bounded by ``timeout``; a peer that does not answer in time counts as not answering.
    """
    routing_table = node.protocol.routing_table
    table_before = len(routing_table.uid_to_peer_id)
    peer_ids = {PeerID.from_base58(Multiaddr(maddr)["p2p"]) for maddr in initial_peers} - {node.peer_id}
    pings = {asyncio.create_task(node.protocol.call_ping(peer_id)): peer_id for peer_id in peer_ids}
    answered, late = await asyncio.wait(pings, timeout=timeout) if pings else (set(), set())
    for task in late:
        task.cancel()
    responders = [pings[task] for task in answered if task.result() is not None]
    for peer_id in responders:
        node.blacklist.register_success(peer_id)  # failures during the cut banned them from lookups for a while
    if responders:
        lookup = asyncio.create_task(node.find_nearest_nodes([node.node_id]))
        if not (await asyncio.wait([lookup], timeout=timeout))[0]:
            lookup.cancel()
    return RebootstrapResult(len(peer_ids), len(responders), table_before, len(routing_table.uid_to_peer_id))


class Rejoiner:
    """Re-bootstraps the DHT from its initial peers when the peer has seen no other peer for ``patience`` seconds.

    ``check`` is called from the training loop; it never waits for the DHT (a re-bootstrap runs in the DHT process and
    is collected on a later call), so training goes on meanwhile. Attempts back off from ``retry_after`` to
    ``max_retry_after`` seconds while the peer stays alone; seeing another peer resets everything.

    Args:
        dht: this peer's DHT (its ``initial_peers`` are the ones dialled again).
        patience: seconds alone before the first attempt.
        retry_after: seconds between the first attempts; doubles after each one, up to ``max_retry_after``.
        max_retry_after: the longest wait between attempts.
        timeout: limit on each stage (pings, lookup) of one attempt, inside the DHT process.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        patience: float,
        retry_after: float = 10.0,
        max_retry_after: float = 120.0,
        timeout: float = 15.0,
    ):
        self.dht, self.patience, self.timeout = dht, patience, timeout
        self.initial_peers = [str(maddr) for maddr in dht.initial_peers or ()]
        self.first_retry_after, self.max_retry_after = retry_after, max_retry_after
        self.retry_after = retry_after
        self.alone_since: float | None = None
        self.next_attempt = 0.0
        self.pending = None  # the MPFuture of the attempt under way
        self.attempts = 0
        self.last_result: RebootstrapResult | None = None

    def check(self, num_peers: int) -> None:
        """Note how many peers (this one included) the progress tracker sees now; re-bootstrap if alone too long."""
        now = time.monotonic()
        self._collect(now)
        if num_peers > 1 or not self.initial_peers:
            if self.alone_since is not None and self.attempts:
                logger.info(f"Back in the swarm ({num_peers} peers) after {now - self.alone_since:.0f} s alone")
            self.alone_since, self.attempts, self.retry_after = None, 0, self.first_retry_after
            return
        if self.alone_since is None:
            self.alone_since, self.next_attempt = now, now + self.patience
        if self.pending is None and now >= self.next_attempt:
            self._start(now)

    def _start(self, now: float) -> None:
        logger.info(f"No other peer seen for {now - self.alone_since:.0f} s: re-bootstrapping from the initial peers")
        coroutine = partial(rebootstrap, initial_peers=self.initial_peers, timeout=self.timeout)
        self.pending = self.dht.run_coroutine(coroutine, return_future=True)
        self.attempts += 1
        self.next_attempt = now + self.retry_after
        self.retry_after = min(2 * self.retry_after, self.max_retry_after)

    def _collect(self, now: float) -> None:
        if self.pending is None or not self.pending.done():
            return
        future, self.pending = self.pending, None
        try:
            self.last_result = future.result()
            logger.info(f"Re-bootstrap {self.attempts}: {self.last_result}")
        except Exception as error:  # noqa: BLE001  (anything raised in the DHT process: the next attempt retries)
            logger.warning(f"Re-bootstrap {self.attempts} failed: {error!r}")
