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
from contextlib import closing, suppress
from typing import NoReturn

import hivemind
from google.protobuf.message import DecodeError
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
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
                try:
                    found = await self.dht.get(members_key(self.run_id), latest=True, return_future=True)
                except Exception as error:  # noqa: BLE001 -- the DHT shutting down or timing out: nothing new known
                    logger.debug(f"Could not read the member list of run {self.run_id!r}: {error!r}")
                    found = None
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


def admit_members_first(
    p2p: P2P, handle_name: str, method_name: str, check: MembershipCheck, refusals: RateLimitedWarning, prefix: str
) -> None:
    """Check the caller of the stream handler ``handle_name`` before a byte of its request is read.

    hivemind reads a request (and, for single-request RPCs, waits for its end-of-stream marker) before it calls an
    RPC method, so a check inside the method left a stranger holding a request's worth of memory per stream for as
    long as it liked. The gate wraps the callback hivemind registered with its p2p client (``control.handlers``, looked
    up for every incoming stream): a non-member's stream gets the RPC's refusal code, if it has one, and is closed.
    """
    handlers = p2p._client.control.handlers
    inner = handlers[handle_name]

    async def members_first(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await check.admits(info.peer_id):
            await inner(info, reader, writer)
            return
        refusals(
            f"{method_name}:{info.peer_id}",
            f"Refused {method_name} ({prefix}) from peer {info.peer_id}: it holds no valid access token "
            f"of run {check.run_id!r}",
        )
        with closing(writer), suppress(Exception):  # a stranger's stream may be gone already
            if method_name in REFUSALS:
                await P2P.send_protobuf(REFUSALS[method_name], writer)

    handlers[handle_name] = members_first


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


def fail_group(running_groups: dict, group_id: bytes, refusal: Exception) -> NoReturn:
    """Refuse to average in a group that matchmaking assembled: raise ``refusal``, after failing the group's running
    future (``DecentralizedAverager._running_groups``), so groupmates' parts waiting for this peer learn it at once."""
    running = running_groups.get(group_id)
    if running is not None and not running.done():
        running.set_exception(refusal)
    raise refusal


class GuardedAveragerMixin:
    """An averager that talks to run members only: its handlers answer members (admit_members_first), it follows
    member leaders only, averages in groups of members only and downloads states from members only."""

    def __init__(self, *args, membership: MembershipCheck, **kwargs):
        self._membership = membership
        self._outgoing_refusals = RateLimitedWarning(logger)
        super().__init__(*args, **kwargs)

    async def add_p2p_handlers(self, p2p, wrapper=None, *, namespace=None, balanced=False) -> None:
        await super().add_p2p_handlers(p2p, wrapper, namespace=namespace, balanced=balanced)
        refusals = RateLimitedWarning(logger)
        for handler in self._rpc_handlers:  # collected by hivemind's add_p2p_handlers just now
            handle_name = self._get_handle_name(namespace, handler.method_name)
            admit_members_first(p2p, handle_name, handler.method_name, self._membership, refusals, namespace or "")

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
            refusal = AllreduceException(
                f"the group holds {len(strangers)} peer(s) without a valid access token of run "
                f"{self._membership.run_id!r} ({', '.join(map(str, strangers[:3]))}): not averaging with it"
            )
            fail_group(self._running_groups, group_info.group_id, refusal)
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
