"""Closed runs: hivemind's averagers talk to run members only, both ways.

hivemind's DHT authorizer does not cover the averagers, so each averager checks the libp2p peer id (which libp2p
authenticates) of every peer it deals with against the run's member list in the DHT: authority-signed, unexpired
tokens naming that id. Incoming: each RPC (matchmaking, all-reduce, state download) answers members only. Outgoing:
a follower asks members only to lead its group, runs an all-reduce only in a group of members, and downloads a state
from members only. Without the outgoing checks a revoked peer that stays online still led groups of members, and so
reduced, and returned, its part of their average (seen in CI: a round of four after the attacker's token ended).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import hivemind
from google.protobuf.message import DecodeError
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
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
        return not await self.strangers([peer_id])

    async def strangers(self, peer_ids) -> list[PeerID]:
        """Those of ``peer_ids`` that are no members now (one read of the member list at most, if any is unknown)."""
        if not self._unknown(peer_ids):
            return []
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
        return self._unknown(peer_ids)

    def _unknown(self, peer_ids) -> list[PeerID]:
        now = get_dht_time()
        return [peer for peer in peer_ids if self._members.get(peer.to_base58(), 0.0) <= now]

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


def follow_members_only(matchmaking: Matchmaking, check: MembershipCheck, refusals: RateLimitedWarning) -> None:
    """Make ``matchmaking`` ask members only to lead its group: another leader counts as one that rejected it.

    hivemind's Matchmaking asks the potential leaders it finds in the DHT (where any member, or a revoked peer whose
    entries have not expired, declares itself) in turn, and follows a leader's redirect to another; both go through
    ``_request_join_group``, wrapped here on the instance (hivemind makes the Matchmaking inside the averager).
    """
    request_join_group = matchmaking._request_join_group

    async def request_members_only(leader: PeerID):
        if not await check.admits(leader):
            refusals(
                f"leader:{leader}",
                f"Did not join the group of peer {leader}: it holds no valid access token of run {check.run_id!r}",
            )
            return None
        return await request_join_group(leader)

    matchmaking._request_join_group = request_members_only


class GuardedAveragerMixin:
    """An averager that talks to run members only: its handlers answer members (GuardedHandlers), it follows member
    leaders only, averages in groups of members only and downloads states from members only."""

    def __init__(self, *args, membership: MembershipCheck, **kwargs):
        self._membership = membership
        self._outgoing_refusals = RateLimitedWarning(logger)
        super().__init__(*args, **kwargs)

    async def add_p2p_handlers(self, p2p, wrapper=None, *, namespace=None, balanced=False) -> None:
        guarded = GuardedHandlers(wrapper or self, self._membership, namespace or "")
        await super().add_p2p_handlers(p2p, guarded, namespace=namespace, balanced=balanced)

    # hivemind's averager assigns its Matchmaking in its own process (DecentralizedAverager._run_internal): this
    # property sees the assignment and guards the instance before anything uses it
    @property
    def _matchmaking(self) -> Matchmaking:
        try:
            return self.__dict__["_guarded_matchmaking"]
        except KeyError:  # not made yet, or not in this process: as a plain attribute would be
            raise AttributeError("_matchmaking") from None

    @_matchmaking.setter
    def _matchmaking(self, matchmaking: Matchmaking) -> None:
        follow_members_only(matchmaking, self._membership, self._outgoing_refusals)
        self.__dict__["_guarded_matchmaking"] = matchmaking

    async def _aggregate_with_group(self, group_info: GroupInfo, *args, **kwargs):
        # a member leader never admits a stranger; a stranger leading is refused above: this is the last line
        strangers = await self._membership.strangers([peer for peer in group_info.peer_ids if peer != self.peer_id])
        if strangers:
            raise AllreduceException(
                f"the group holds {len(strangers)} peer(s) without a valid access token of run "
                f"{self._membership.run_id!r} ({', '.join(map(str, strangers[:3]))}): not averaging with it"
            )
        return await super()._aggregate_with_group(group_info, *args, **kwargs)

    async def _donors(self) -> list[PeerID]:
        # called by CheckedDownloads (state_check.py), among the bases of every guarded averager that downloads
        donors = await super()._donors()
        strangers = set(await self._membership.strangers(donors))
        if strangers:
            self._outgoing_refusals(
                "donors", f"Not downloading a state from {len(strangers)} peer(s) without a valid access token"
            )
        return [peer for peer in donors if peer not in strangers]
