"""Every member of a robust round averages in the group it was told of, or not with the members told of another.

hivemind's leader sends each follower the group it assembled (group id, members in order, each member's gathered
declaration) in a message of its own, and nobody compares them. A leader can tell followers different orders of
the same members: each then sends the slice of its vector that, in its own order, a groupmate reduces, reducers
average slices of different places, and the results land in the wrong places, silently (with equal shares the
slices are of the same size: nothing fails). Or it can tell each honest member a group of itself and the leader
only, as far as the parts go, where CenteredClip cannot outvote anybody.

Here each member of a robust round sends, with its first part to each reducer, a digest of its view of the group:
the members in order and their gathered entries (``view_digest``: modes and user data; the bandwidths are made
equal before, robust_allreduce.py's ``equal_shares``), in the ``peer_id`` field of hivemind's
AveragingData, which hivemind 1.1.12 neither sets nor reads (so peers running hivemind's own rounds average with these
as before, and their parts, carrying no digest, are taken: they are their own parts, misled or not). A reducer refuses
a part under another digest (its sender is banned for the round, as for any refused part, and it is logged), and the
sender, answered BAD_GROUP_ID, keeps its own values for that share. Nobody can tell from the parts who lied (the
leader, or a member sending another digest), so this refuses and names, it does not revoke. A peer whose round
averaged with fewer members of its view than the group minimum (``--robust-quorum``) applies nothing from it
(``refuse_split_group``): a leader that splits a group into pairs of itself and one honest member gains nothing
beyond the share it reduces itself. Without a quorum the minimum is hivemind's 2, and such a pair is averaged, as any
group of two is (docs/robust-aggregation.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator

from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2

logger = logging.getLogger(__name__)
VIEW_DIGEST_BYTES = 16


def view_digest(group_info: GroupInfo) -> bytes:
    """A digest of what a follower was told of its group: the members, in order, and their gathered declarations."""
    digest = hashlib.blake2b(digest_size=VIEW_DIGEST_BYTES, person=b"albert-swarm-gv")
    for peer_id, gathered in zip(group_info.peer_ids, group_info.gathered, strict=True):
        for field in (peer_id.to_bytes(), gathered):  # each length-prefixed: no two lists hash alike by concatenation
            digest.update(len(field).to_bytes(8, "big"))
            digest.update(field)
    return digest.digest()


class ViewBoundRunner:
    """AllReduceRunner mixin (before it among the bases): its first part to each reducer carries ``view_digest``, and
    it refuses parts sent under another (counting their senders in ``refused_views``)."""

    def __init__(self, *, view_digest: bytes, **kwargs):
        super().__init__(**kwargs)
        self.view_digest = view_digest
        self.refused_views: set[PeerID] = set()
        self._bans: set[asyncio.Task] = set()  # referenced until done: a task nobody holds may be collected

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        first = True
        async for message in super()._generate_input_for_peer(peer_index):
            if first:
                message.peer_id = self.view_digest
                first = False
            yield message

    def _check_reasons_to_reject(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> averaging_pb2.AveragingData | None:
        refusal = super()._check_reasons_to_reject(request, context)
        if refusal is None and request.peer_id and request.peer_id != self.view_digest:
            self._refuse_other_view(context.remote_id)
            return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
        return refusal

    def _refuse_other_view(self, sender: PeerID) -> None:
        if sender not in self.refused_views:
            self.refused_views.add(sender)
            logger.warning(
                f"Refused the parts of groupmate {sender}: it was told of another group than this peer (other "
                "members, order or entries) by the leader, or it sent a forged view; banned for the round"
            )
        ban = asyncio.create_task(self._ban_sender(sender))  # the reducer goes on without its parts at once
        self._bans.add(ban)
        ban.add_done_callback(self._bans.discard)


def refuse_split_group(runner: ViewBoundRunner, group_info: GroupInfo, min_group_size: int) -> None:
    """Raise an AllreduceException if members told of another group were refused in this peer's round and it
    reduced the parts of fewer members than ``min_group_size`` (nothing of such a round may be applied)."""
    if not runner.refused_views:
        return
    # the senders whose parts this peer reduced: a member of the view that never sent (a leader can name peers that
    # are not there) counts no more than one that sent another view
    kept = len(runner.sender_peer_ids) - len(runner.banned_senders)
    if kept < min_group_size:
        raise AllreduceException(
            f"{len(runner.refused_views)} of {len(group_info.peer_ids) - 1} groupmates were told of another group: "
            f"this round averaged the parts of {kept} member(s), under the minimum of {min_group_size}; applying "
            "nothing of it"
        )
