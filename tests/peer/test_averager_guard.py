"""Closed runs: a member's averager deals with members only, outgoing as well as incoming (real DHTs, real averagers).

The stranger here is what a revoked attacker that stays online is once its token ended: a plain hivemind averager on
the run's prefix, declaring itself as a leader and as a state donor, answering whoever calls it.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing as mp
import time
from typing import AsyncIterator  # noqa: UP035 -- hivemind finds stream RPCs by typing's _name

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

from peer.hivemind_gaps.averager_guard import GuardedAveragerMixin, MembershipCheck
from peer.hivemind_gaps.averagers import HivemindHandleNames
from peer.hivemind_gaps.state_check import CheckedDownloads
from peer.swarm.access_tokens import members_key
from tests.peer.test_access import AUTHORITY, LOOPBACK, signed_token

PREFIX = "guard_test"


class CountingStranger(HivemindHandleNames, DecentralizedAverager):
    """A plain averager (a stranger) that counts the requests to lead a group it receives."""

    def __init__(self, *args, **kwargs):
        self.join_requests = mp.Value(ctypes.c_int, 0)  # counted in the averager's process, read in this one
        super().__init__(*args, **kwargs)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        with self.join_requests.get_lock():
            self.join_requests.value += 1
        async for message in super().rpc_join_group(request, context):
            yield message


class MembersOnlyAverager(HivemindHandleNames, GuardedAveragerMixin, DecentralizedAverager):
    """The guard on hivemind's base averager: what every guarded averager of the swarm composes."""


class PlainAverager(HivemindHandleNames, DecentralizedAverager):
    """hivemind's averager, unguarded."""


def start_dht(initial: hivemind.DHT | None = None) -> hivemind.DHT:
    peers = [str(maddr) for maddr in initial.get_visible_maddrs()] if initial else []
    return hivemind.DHT(initial_peers=peers, start=True, host_maddrs=LOOPBACK)


def admit(dht: hivemind.DHT) -> None:
    """Store an authority-signed token of ``dht``'s peer id in the run's member list."""
    token = signed_token(dht.peer_id.to_base58(), b"key of " + dht.peer_id.to_bytes(), 300)
    stored = dht.store(
        members_key("run"), token.SerializeToString(), get_dht_time() + 300, subkey=dht.peer_id.to_bytes()
    )
    assert stored


class Scene:
    """Three DHT nodes: the stranger's first, then two members' (admitted); the averagers made on them."""

    def __init__(self):
        self.stranger_dht = start_dht()
        self.member_dhts = [start_dht(self.stranger_dht), start_dht(self.stranger_dht)]
        self.averagers: list[DecentralizedAverager] = []
        for dht in self.member_dhts:
            admit(dht)

    def stranger(self, cls, **kwargs) -> DecentralizedAverager:
        return self._started(averager(cls, self.stranger_dht, **kwargs))

    def members(self, cls, tensors=(None, None), **kwargs) -> list[DecentralizedAverager]:
        return [
            self._started(averager(cls, dht, own, membership=membership(dht), **kwargs))
            for dht, own in zip(self.member_dhts, tensors)
        ]

    def unguarded_member(self, cls) -> DecentralizedAverager:
        """An averager of ``cls`` on the first member's DHT, without the guard (what the test compares against)."""
        return self._started(averager(cls, self.member_dhts[0]))

    def _started(self, each: DecentralizedAverager) -> DecentralizedAverager:
        self.averagers.append(each)
        return each

    def shutdown(self) -> None:
        for each in self.averagers:
            each.shutdown()
        for dht in (self.stranger_dht, *self.member_dhts):
            dht.shutdown()


@pytest.fixture
def scene():
    made = Scene()
    yield made
    made.shutdown()


def membership(dht: hivemind.DHT) -> MembershipCheck:
    return MembershipCheck(dht, "run", AUTHORITY.get_public_key())


def averager(cls, dht: hivemind.DHT, tensors=None, **kwargs) -> DecentralizedAverager:
    return cls(
        tensors or [torch.zeros(8)],
        dht,
        prefix=PREFIX,
        target_group_size=3,
        min_group_size=2,
        min_matchmaking_time=3.0,
        request_timeout=1.0,
        start=True,
        **kwargs,
    )


@pytest.mark.timeout(180)
def test_members_do_not_follow_a_stranger_that_leads_and_average_among_themselves(scene):
    """The stranger starts looking first, so by hivemind's rules it is the leader both members ask; they average
    with each other only. Without the outgoing checks both joined its group (a round of three, in CI)."""
    stranger = scene.stranger(CountingStranger)
    members = scene.members(MembersOnlyAverager)
    stranger_round = stranger.step(gather="stranger", scheduled_time=get_dht_time() + 6, timeout=20, wait=False)
    time.sleep(2.0)  # the stranger has declared itself (the earliest expiration: every member's first leader)
    rounds = [
        member.step(gather=f"member {index}", scheduled_time=get_dht_time() + 6, timeout=60, wait=False)
        for index, member in enumerate(members)
    ]
    gathered = [future.result(timeout=90) for future in rounds]
    member_ids = {dht.peer_id for dht in scene.member_dhts}
    for result in gathered:
        assert set(result) == member_ids, f"a member averaged in a group of {sorted(map(str, result))}"
    with pytest.raises(Exception):  # noqa: B017 -- whatever hivemind raises: the stranger found nobody
        stranger_round.result(timeout=60)


@pytest.mark.timeout(180)
def test_a_member_never_asks_a_stranger_to_lead_even_when_no_one_else_can(scene):
    """Members in client mode cannot lead, so the stranger is the only leader there is: they never ask it (its count
    of requests stays 0) and their rounds find no group. Without the check both asked it at once."""
    stranger = scene.stranger(CountingStranger)
    members = scene.members(MembersOnlyAverager, client_mode=True)
    stranger.step(gather="stranger", scheduled_time=get_dht_time() + 6, timeout=30, wait=False)
    time.sleep(2.0)  # the stranger has declared itself as a leader
    rounds = [member.step(gather="member", timeout=15, wait=False) for member in members]
    for future in rounds:
        with pytest.raises(Exception):  # noqa: B017 -- hivemind's "could not find a group", whatever its type
            future.result(timeout=60)
    assert stranger.join_requests.value == 0, f"members asked the stranger to lead {stranger.join_requests.value}x"


class MembersOnlyDonorsAverager(HivemindHandleNames, GuardedAveragerMixin, CheckedDownloads):
    """The guard on the averager that downloads states (as every guarded averager of the swarm that downloads)."""

    def get_current_state(self):
        _, tensors, infos = super().get_current_state()
        return {"epoch": 0}, tensors, infos  # the metadata a swarm state carries (CheckedDownloads reads its epoch)


class StrangerDonor(HivemindHandleNames, DecentralizedAverager):
    def get_current_state(self):
        _, tensors, infos = super().get_current_state()
        return {"epoch": 0}, tensors, infos  # a state a member would accept, but for who serves it


@pytest.mark.timeout(180)
def test_a_joiner_downloads_the_state_of_a_member_not_of_a_stranger_at_a_higher_priority(scene):
    stranger = scene.stranger(StrangerDonor, tensors=[torch.full((8,), 666.0)])
    stranger.state_sharing_priority = 10.0  # asked first by hivemind's rule
    _, joiner = scene.members(MembersOnlyDonorsAverager, tensors=([torch.ones(8)], [torch.zeros(8)]))
    time.sleep(3.0)  # both donors declared themselves (hivemind declares every few seconds)
    loaded = joiner.load_state_from_peers(timeout=30)
    assert loaded is not None, "nothing downloaded: the member donor was not asked"
    _, tensors = loaded
    assert torch.equal(tensors[0], torch.ones(8)), f"downloaded {tensors[0]}: the stranger's state"


async def stranger_starts_a_large_part(stranger: hivemind.DHT, member: hivemind.DHT, handle_name: str) -> bytes | None:
    """Open a stream to ``member``'s handler, announce a 3 MiB message (under the 4 MiB bound) and send 64 KiB of it;
    what the member sent before closing the stream, or None if it still waits for the rest after 5 s."""
    p2p = await stranger.replicate_p2p()
    _, reader, writer = await p2p.call_binary_stream_handler(member.peer_id, handle_name)
    try:
        writer.write(P2P.MESSAGE_MARKER + (3 * 2**20).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"\0" * 2**16)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5.0)
    except ConnectionError:
        return b""  # reset while the stranger sent: closed as well
    except TimeoutError:
        return None
    finally:
        writer.close()


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "hivemind"])
@pytest.mark.timeout(120)
def test_a_strangers_stream_is_refused_before_its_request_is_read(scene, guarded):
    """The gate answers a stranger's stream with the refusal code and closes it while the stranger's first message
    is still arriving; hivemind's own handler waits for the whole message (it reads before it calls the method)."""
    if guarded:
        scene.members(MembersOnlyAverager)
    else:
        scene.unguarded_member(PlainAverager)
    handle_name = PlainAverager._get_handle_name(PREFIX, "rpc_aggregate_part")  # hivemind's name, either way
    answered = asyncio.run(stranger_starts_a_large_part(scene.stranger_dht, scene.member_dhts[0], handle_name))
    if not guarded:
        assert answered is None, f"hivemind's handler closed the stream early ({answered!r}): the test shows nothing"
        return
    assert answered is not None, "the member still reads the stranger's message: the gate did not run before it"
    refusal = averaging_pb2.AveragingData()
    header = len(P2P.MESSAGE_MARKER) + P2P.HEADER_LEN
    refusal.ParseFromString(answered[header:])
    assert refusal.code == averaging_pb2.PROTOCOL_VIOLATION, answered
