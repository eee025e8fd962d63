"""Who votes on a revocation (monitor/revocation.py): only members the authority admitted, one vote per join
credential, never on oneself, and more than half of at least ``--revoke-quorum`` votes must accuse.

Against the real Authority (join requests as a peer sends them) and a real SQLite file; the framing member signs its
score records with keys it never joined with and stores them in a real hivemind DHT, where the monitor reads them.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from monitor.access import Authority
from monitor.config import MonitorConfig
from monitor.records import monitor_validators, read_suspects
from monitor.revocation import RevocationPolicy, RevocationStore, member_suspects
from peer.swarm.access_tokens import join_message
from peer.swarm.progress import local_public_key
from peer.swarm.scores import ScoreRecord, scores_key

SECRET = "closed-run-secret-0123456789"
THRESHOLD = 100.0
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Member:
    """A peer that joined the run: its libp2p id, the RSA key it joined (and signs its records) with, its records'
    DHT subkey."""

    def __init__(self, tmp_path: Path, name: str):
        identity = tmp_path / f"{name}.id"
        P2P.generate_identity(str(identity))
        self.peer_id = PeerID.from_identity(identity.read_bytes()).to_base58()
        self.key = RSAPrivateKey()
        self.owner = local_public_key(self.key)

    def join(self, authority: Authority, join_key: RSAPrivateKey | None = None) -> Member:
        """Post a join request as peer/swarm/join_client.py does: with the run secret, or signed by a join key."""
        public_key, timestamp = self.key.get_public_key().to_bytes(), int(get_dht_time())
        message = join_message(public_key, self.peer_id, timestamp)
        request = {"peer_id": self.peer_id, "public_key": public_key.decode(), "timestamp": timestamp}
        if join_key is None:
            request["hmac"] = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
        else:
            request["join_key"] = join_key.get_public_key().to_bytes().decode()
            request["signature"] = join_key.sign(message).decode()
        assert authority.join(request)["token"]
        return self


def record(scores: dict[str, float]) -> ScoreRecord:
    return ScoreRecord(epoch=9, time=float(get_dht_time()), rounds=4, scores=scores)


@pytest.fixture
def run(tmp_path):
    """A closed run's authority (run secret and allowlist), its revocations table, the allowlisted join key."""
    (tmp_path / "run.secret").write_text(SECRET + "\n")
    join_key = RSAPrivateKey()
    (tmp_path / "allowlist").write_text(join_key.get_public_key().to_bytes().decode() + " shared-box\n")
    store = RevocationStore(tmp_path / "history.sqlite")
    authority = Authority(
        tmp_path / "authority.key", 60.0, str(tmp_path / "run.secret"), str(tmp_path / "allowlist"), store
    )
    yield authority, store, join_key
    store.close()


def revoked_after(policy: RevocationPolicy, rows: tuple, refreshes: int) -> list[str]:
    """Whom the policy revokes when the same votes come `refreshes` times."""
    return [suspect.peer_id for _ in range(refreshes) for suspect, _ in policy.observe(rows)]


def test_more_than_half_of_a_quorum_of_members_must_accuse(run, tmp_path):
    authority, store, _ = run
    accused = Member(tmp_path, "accused").join(authority)
    voters = [Member(tmp_path, f"voter{index}").join(authority) for index in range(5)]

    def tally(accusing: int, voting: int) -> tuple:
        records = {
            voter.owner: record({accused.peer_id: 500.0 if index < accusing else 1.2})
            for index, voter in enumerate(voters[:voting])
        }
        return member_suspects(records, store, THRESHOLD)

    policy = RevocationPolicy(THRESHOLD, refreshes=3, quorum=3)
    # two members, both accusing: under the quorum, however long it lasts
    [row] = tally(accusing=2, voting=2)
    assert (row.reporters, row.suspicion) == (2, 500.0) and revoked_after(policy, (row,), 10) == []
    # half of four is not more than half: the lower median is an honest score
    [row] = tally(accusing=2, voting=4)
    assert row.suspicion == 1.2 and revoked_after(policy, (row,), 10) == []
    # three of five: revoked at the third refresh in a row
    [row] = tally(accusing=3, voting=5)
    assert (row.reporters, row.suspicion) == (5, 500.0)
    assert revoked_after(policy, (row,), 3) == [accused.peer_id]


def test_keys_no_member_joined_with_frame_nobody_even_from_a_real_dht(run, tmp_path):
    """A member signs framing records with three keys of its own making (Sybils) and stores them in a real DHT; the
    monitor reads them there. The dashboard's suspicion (every reporter's median) calls the framed member suspicious;
    the vote counts only the members' records and revokes nobody."""
    authority, store, _ = run
    framer, framed = Member(tmp_path, "framer").join(authority), Member(tmp_path, "framed").join(authority)
    honest = [Member(tmp_path, f"honest{index}").join(authority) for index in range(3)]
    monitor = hivemind.DHT(start=True, host_maddrs=LOOPBACK, record_validators=monitor_validators("votes"))
    writers = []
    try:
        initial_peers = [str(maddr) for maddr in monitor.get_visible_maddrs()]
        framing = [RSAPrivateKey() for _ in range(3)] + [framer.key]
        for signer, score in [*((key, 1e6) for key in framing), *((member.key, 1.1) for member in honest)]:
            dht = hivemind.DHT(
                initial_peers=initial_peers,
                start=True,
                host_maddrs=LOOPBACK,
                record_validators=[RSASignatureValidator(signer)],
            )
            writers.append(dht)
            stored = dht.store(
                scores_key("votes"),
                subkey=local_public_key(signer),
                value=record({framed.peer_id: score}).dict(),
                expiration_time=get_dht_time() + 60,
            )
            assert stored, "the DHT refused a well-formed signed record"
        shown, records = read_suspects(monitor, "votes")
        assert len(records) == 7
        assert [(row.peer_id, row.suspicious) for row in shown] == [(framed.peer_id, True)]  # 4 framing of 7

        [row] = member_suspects(records, store, THRESHOLD)
        assert (row.peer_id, row.reporters, row.suspicious) == (framed.peer_id, 4, False)  # the framer and 3 honest
        assert revoked_after(RevocationPolicy(THRESHOLD, refreshes=3, quorum=3), (row,), 10) == []
        assert set(store.member_records(records)) == {framer.owner, *(member.owner for member in honest)}
    finally:
        for dht in writers:
            dht.shutdown()
        monitor.shutdown()


def test_a_credential_votes_once_never_on_itself_and_not_after_its_revocation(run, tmp_path):
    authority, store, shared = run
    # three peers of one allowlisted join key (one operator's box): one vote, the mildest of its three
    box = [Member(tmp_path, f"box{index}").join(authority, shared) for index in range(3)]
    others = [Member(tmp_path, f"other{index}").join(authority) for index in range(2)]
    target = Member(tmp_path, "target").join(authority)
    records = {member.owner: record({target.peer_id: score}) for member, score in zip(box, (900.0, 800.0, 300.0))}
    records.update({member.owner: record({target.peer_id: score}) for member, score in zip(others, (400.0, 200.0))})
    [row] = member_suspects(records, store, THRESHOLD)
    assert (row.reporters, row.suspicion) == (3, 300.0)  # votes 300 (the box), 400, 200

    # the accused and the peers of its join key do not vote on it: their clearing scores are not counted
    accused = box[1]
    records = {member.owner: record({accused.peer_id: 0.0}) for member in box}
    records.update({member.owner: record({accused.peer_id: 700.0}) for member in [*others, target]})
    [row] = member_suspects(records, store, THRESHOLD)
    assert (row.peer_id, row.reporters, row.suspicion) == (box[1].peer_id, 3, 700.0)

    # a revoked member's records vote no more (it left them in the DHT)
    store.revoke(row, 3, THRESHOLD, store.member_records(records))
    assert store.voter(box[1].owner) is None and store.voter(box[0].owner) is not None
    # nor do keys the authority never saw, or subkeys that are not keys at all
    assert store.voter(local_public_key(RSAPrivateKey())) is None and store.voter(b"not a key") is None


def test_a_member_that_joins_again_with_another_key_votes_with_that_one_only(run, tmp_path):
    authority, store, _ = run
    member = Member(tmp_path, "rekeyed").join(authority)
    old_owner = member.owner
    member.key = RSAPrivateKey()
    member.owner = local_public_key(member.key)
    member.join(authority)
    assert store.voter(old_owner) is None and store.voter(member.owner).peer_id == member.peer_id


def test_the_quorum_is_at_least_two(tmp_path):
    with pytest.raises(ValueError, match="revoke_quorum must be at least 2"):
        MonitorConfig(run_dir=str(tmp_path), revoke_quorum=1)
