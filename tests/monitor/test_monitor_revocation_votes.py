"""Who votes on a revocation (monitor/revocation.py): only members the authority admitted, one vote per join
credential, never on oneself, and more than half of at least ``--revoke-quorum`` votes must accuse.

Against the real Authority (join requests as a peer sends them) and a real SQLite file; the framing member signs its
score records with keys it never joined with and stores them in a real hivemind DHT, where the monitor reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from monitor.access import AdmissionRefused, Authority
from monitor.checkpoint import CheckpointStore
from monitor.config import MonitorConfig
from monitor.contributor_store import ContributorStore
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.records import monitor_validators, read_suspects
from monitor.revocation import RevocationPolicy, RevocationStore, member_suspects
from monitor.server import ServerThread, create_app
from monitor.suspicion import suspects
from peer.swarm.peer_identity import PeerIdentity
from peer.swarm.progress import local_public_key, peer_label
from peer.swarm.scores import ScoreRecord, scores_key
from tests.monitor.conftest import chromium
from tests.monitor.joining import JoinKeyCredential, SecretCredential, forged_join, signed_join
from tests.monitor.test_contributors import Run, report
from tests.monitor.test_monitor_revocation import http_json

SECRET = "closed-run-secret-0123456789"
THRESHOLD = 100.0
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Member:
    """A peer that joined the run: its libp2p id, the RSA key it joined (and signs its records) with, its records'
    DHT subkey."""

    def __init__(self, tmp_path: Path, name: str):
        self.identity = PeerIdentity.generate()
        self.peer_id = self.identity.peer_id.to_base58()
        self.key = RSAPrivateKey()
        self.owner = local_public_key(self.key)

    def join(self, authority: Authority, join_key: RSAPrivateKey | None = None) -> Member:
        """Post a join request as peer/swarm/join_client.py does: with the run secret, or signed by a join key."""
        credential = SecretCredential(SECRET) if join_key is None else JoinKeyCredential(join_key)
        assert authority.join(signed_join(self.identity, self.key, credential))["token"]
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


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked-control"])
def test_a_member_cannot_take_over_another_members_key_or_peer_id(run, tmp_path, monkeypatch, checked):
    """A member holding the run secret joins naming an honest member's RSA key (so that the honest member's records
    would vote as the thief, and their accusations of the thief count as its votes on itself, dropped) and then its
    peer id (to be scored and revoked in its name). Both are refused, and the honest member's records still vote as
    the honest member. The control, with the proofs not checked: the thief takes the honest member's votes over."""
    authority, store, _ = run
    if not checked:
        monkeypatch.setattr(Authority, "_check_possession", staticmethod(lambda *args: None))
    honest = Member(tmp_path, "honest").join(authority)
    thief = Member(tmp_path, "thief").join(authority)
    honest_key = honest.key.get_public_key().to_bytes()
    thief_key = thief.key.get_public_key().to_bytes()
    claims = [
        (forged_join(thief.identity, thief.key, SECRET, honest_key, thief.peer_id), "'key_signature' is not"),
        (forged_join(thief.identity, thief.key, SECRET, thief_key, honest.peer_id), "'peer_key' is not the key of"),
    ]
    for request, refusal in claims:
        if checked:
            with pytest.raises(AdmissionRefused, match=refusal):
                authority.join(request)
        else:
            authority.join(request)
    voter = store.voter(honest.owner)
    if checked:
        assert voter is not None and voter.peer_id == honest.peer_id
        assert store.voter(thief.owner).peer_id == thief.peer_id
    else:
        assert voter is None or voter.peer_id != honest.peer_id, "the control: the thief's claims changed nothing"


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


def test_a_members_suspicion_is_shown_on_its_contributor_row_over_http(run, tmp_path):
    """The scores name libp2p peer ids, the contributors table signing keys: the members' proven joins tie the two.
    Over real HTTP, /api/contributors carries each member's suspicion and verdict, /api/suspects each sender's
    contributor id, and a contributor no member joined as (an open run's peer) gets none."""
    authority, store, _ = run
    thief, honest = Member(tmp_path, "thief").join(authority), Member(tmp_path, "honest").join(authority)
    labels = {member.peer_id: peer_label(member.owner) for member in (thief, honest)}
    stranger = peer_label(b"a key nobody joined with")
    contributors = ContributorStore(tmp_path / "history.sqlite")
    reports = [report(label, 100.0, total=8) for label in (*labels.values(), stranger)]
    contributors.save(Run().refresh(100.0, *reports))
    live = LiveState(run_id="votes")
    votes = [record({thief.peer_id: 500.0, honest.peer_id: 1.1}), record({thief.peer_id: 700.0, honest.peer_id: 1.3})]
    live.suspects = tuple(suspects(votes))
    live.contributor_of_peer = store.contributors_of_members()
    history = History(tmp_path / "history.sqlite")
    checkpoints = CheckpointStore(tmp_path / "checkpoints", history)
    app = create_app(live, history, checkpoints, make_registry(live, checkpoints), contributors=contributors)
    server = ServerThread(app, "127.0.0.1", 0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        rows = {row["peer_id"]: row for row in http_json(url + "/api/contributors")}
        assert (rows[labels[thief.peer_id]]["suspicion"], rows[labels[thief.peer_id]]["verdict"]) == (
            600.0,
            "suspicious",
        )
        assert rows[labels[honest.peer_id]]["verdict"] == "ok" and rows[labels[honest.peer_id]][
            "suspicion"
        ] == pytest.approx(1.2)
        assert (rows[stranger]["suspicion"], rows[stranger]["verdict"]) == (None, None)
        shown = {row["peer_id"]: row["contributor"] for row in http_json(url + "/api/suspects")}
        assert shown == labels
        # the dashboard, in Chromium: the verdict in the member's contributor row, and a link from its suspect row
        dom = chromium(url + "/", tmp_path, "--dump-dom")
        table = dom.split('id="contributors-table"')[1].split("</table>")[0]
        thief_row = re.search(
            rf'<tr class="(\w+ suspicious)" data-peer-id="{labels[thief.peer_id]}">(.*?)</tr>', table
        )
        assert thief_row and '<td class="num suspicion">600 suspicious</td>' in thief_row.group(2), table
        assert re.search(rf'data-peer-id="{stranger}">.*?<td class="num suspicion">–</td>', table)
        assert f'href="/contributor?id={labels[thief.peer_id]}"' in dom.split('id="suspects-table"')[1]
    finally:
        server.stop()
        contributors.close()
        history.close()
