"""Closed runs: hivemind's averager RPCs (matchmaking, all-reduce, state download) answer run members only.

hivemind's DHT authorizer does not cover the averagers, so each averager checks the caller's libp2p peer id (which
libp2p authenticates) against the run's member list in the DHT: authority-signed, unexpired tokens naming that id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import hivemind
from google.protobuf.message import DecodeError
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPublicKey

from peer.swarm.access_tokens import RateLimitedWarning, members_key, token_expiry, verify_token

logger = logging.getLogger(__name__)
MEMBERS_REFETCH = 1.0  # seconds: unknown callers trigger at most one read of the member list this often

# what a refused caller receives: a protocol violation where the protocol has codes, else an empty stream
REFUSALS = {
    "rpc_join_group": averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION),
    "rpc_aggregate_part": averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION),
}


class MembershipCheck:
    """Answers "is this peer id an admitted member of the run now?" from the DHT's member list, with a short cache.

    Used inside an averager's process (hivemind forks it; the DHT handle works there).

    Args:
        dht: the DHT node of this peer.
        run_id: the run's name.
        authority_key: the run authority's public key.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, authority_key: RSAPublicKey):
        self.dht, self.run_id, self.authority_key = dht, run_id, authority_key
        self._members: dict[str, float] = {}  # peer id (base58) -> expiry of its newest valid token
        self._fetched_at = -MEMBERS_REFETCH
        self._lock: asyncio.Lock | None = None  # made in the averager's event loop, on first use

    async def admits(self, peer_id: PeerID) -> bool:
        name = peer_id.to_base58()
        if self._members.get(name, 0.0) > get_dht_time():
            return True
        missed_at = time.monotonic()
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._fetched_at < missed_at:  # no read of the list began since this miss: read it (at most 1/s)
                await asyncio.sleep(max(0.0, self._fetched_at + MEMBERS_REFETCH - time.monotonic()))
                self._fetched_at = time.monotonic()
                found = await self.dht.get(members_key(self.run_id), latest=True, return_future=True)
                # merged, not replaced: a token stays valid until it expires, even if one read of the list misses it
                for member, expiry in self.valid_members(found).items():
                    self._members[member] = max(expiry, self._members.get(member, 0.0))
        return self._members.get(name, 0.0) > get_dht_time()

    def valid_members(self, found) -> dict[str, float]:
        """Peer ids with a valid token in a read of the member list, and when each token expires."""
        if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
            return {}
        members = {}
        for entry in found.value.values():
            try:
                token = AccessToken.FromString(entry.value)
            except (DecodeError, TypeError, AttributeError):
                continue
            if verify_token(token, self.authority_key):
                members[token.username] = max(members.get(token.username, 0.0), token_expiry(token))
        return members


class GuardedHandlers:
    """Stands in for an averager when its RPC handlers are registered: each rpc_* first checks the caller.

    Args:
        servicer: the averager whose handlers are guarded.
        check: the membership check.
        prefix: the averager's DHT prefix (for log lines).
    """

    def __init__(self, servicer: DecentralizedAverager, check: MembershipCheck, prefix: str):
        self._servicer, self._check, self._prefix = servicer, check, prefix
        self._refusals = RateLimitedWarning(logger)

    def __getattr__(self, name: str):
        if not name.startswith("rpc_"):
            raise AttributeError(name)
        handler = getattr(self._servicer, name)

        async def guarded(request, context: P2PContext) -> AsyncIterator:
            if await self._check.admits(context.remote_id):
                async for response in handler(request, context):
                    yield response
                return
            self._refusals(
                f"{name}:{context.remote_id}",
                f"Refused {name} ({self._prefix}) from peer {context.remote_id}: it holds no valid access token "
                f"of run {self._check.run_id!r}",
            )
            if name in REFUSALS:
                yield REFUSALS[name]

        return guarded


class GuardedAveragerMixin:
    """Registers an averager's handlers behind GuardedHandlers; everything else is the hivemind averager's own."""

    def __init__(self, *args, membership: MembershipCheck, **kwargs):
        self._membership = membership
        super().__init__(*args, **kwargs)

    async def add_p2p_handlers(self, p2p, wrapper=None, *, namespace=None, balanced=False) -> None:
        guarded = GuardedHandlers(wrapper or self, self._membership, namespace or "")
        await super().add_p2p_handlers(p2p, guarded, namespace=namespace, balanced=balanced)
