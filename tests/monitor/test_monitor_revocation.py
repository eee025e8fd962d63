"""Revocation in closed runs (`--revoke-above`): the monitor stops renewing the token of a member the robust
reducers keep accusing, saves the decision with its evidence in SQLite, and refuses it after a restart too.

The decision's parts against a real SQLite file and the real Authority (join requests as a peer sends them); then a
real closed run: a monitor, three honest peers and a sign-flipping member (tests/peer/byzantine.py), all separate
processes aggregating with CenteredClip. The attacker is revoked and cannot renew its token; once it ended, the attacker
(which does not leave when told) takes part in no further round of the honest members; no honest member is revoked.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from monitor.access import AdmissionRefused, Authority
from monitor.checkpoint import CheckpointStore
from monitor.config import MonitorConfig
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.revocation import MAX_SHOWN, RevocationPolicy, RevocationStore
from monitor.server import ServerThread, create_app
from monitor.suspicion import suspects
from peer.swarm.access_tokens import encode_token
from peer.swarm.peer_identity import PeerIdentity
from peer.swarm.run_key import RunKey
from peer.swarm.scores import ScoreRecord
from tests.harness import wait_until
from tests.monitor.conftest import PEER_FLAGS, MonitorProcess, PeerProcess, Process
from tests.monitor.joining import SecretCredential, signed_join

SECRET = "closed-run-secret-0123456789"


def join_request(identity: PeerIdentity, key: RSAPrivateKey, secret: str = SECRET) -> dict:
    """What peer/swarm/join_client.py posts: its RSA key, libp2p id, the time, the secret's HMAC, both keys' proofs."""
    return signed_join(identity, key, SecretCredential(secret))


def peer_id(identity: PeerIdentity) -> str:
    return identity.peer_id.to_base58()


def record(epoch: int, scores: dict[str, float]) -> ScoreRecord:
    return ScoreRecord(epoch=epoch, time=float(get_dht_time()), rounds=3, scores=scores)


def authority(tmp_path: Path) -> tuple[Authority, RevocationStore]:
    (tmp_path / "run.secret").write_text(SECRET + "\n")
    store = RevocationStore(tmp_path / "history.sqlite")
    return Authority(tmp_path / "authority.key", 60.0, str(tmp_path / "run.secret"), revocations=store), store


def test_the_streak_must_be_unbroken_and_above_the_threshold():
    policy = RevocationPolicy(threshold=100.0, refreshes=3, quorum=2)
    accused, honest = "QmAccused", "QmHonest"
    high = [record(5, {accused: 900.0, honest: 1.2}), record(5, {accused: 700.0, honest: 0.9})]
    mixed = [record(6, {accused: 900.0}), record(6, {accused: 50.0}), record(6, {accused: 60.0})]  # median 60
    assert policy.observe(tuple(suspects(high))) == []
    assert policy.observe(tuple(suspects(mixed))) == []  # a refresh at or below the threshold breaks the streak
    assert policy.observe(tuple(suspects(high))) == [] and policy.observe(tuple(suspects(high))) == []
    [(suspect, streak)] = policy.observe(tuple(suspects(high)))
    assert (suspect.peer_id, streak, suspect.suspicion) == (accused, 3, 800.0)
    assert policy.observe(tuple(suspects(high))) == []  # decided once, not at every later refresh


def test_a_revoked_member_gets_no_token_under_its_id_or_key_and_it_outlives_a_restart(tmp_path):
    auth, store = authority(tmp_path)
    accused_identity, honest = PeerIdentity.generate(), PeerIdentity.generate()
    accused = peer_id(accused_identity)
    accused_key, honest_key = RSAPrivateKey(), RSAPrivateKey()
    token = auth.join(join_request(accused_identity, accused_key))["token"]
    auth.join(join_request(honest, honest_key))
    records = {
        b"reporter-1": record(7, {accused: 950.0, peer_id(honest): 1.1}),
        b"reporter-2": record(8, {accused: 880.0}),
    }
    [row] = [row for row in suspects(records.values()) if row.peer_id == accused]
    decision = store.revoke(row, 3, 100.0, records)
    assert [(item["epoch"], item["score"]) for item in decision.evidence] == [(7, 950.0), (8, 880.0)]
    assert "950 at epoch 7" in decision.summary() and "above 100 for 3 refreshes" in decision.summary()

    with pytest.raises(AdmissionRefused, match=rf"revoked from this run at .* \(peer {accused}\)"):
        auth.join(join_request(accused_identity, accused_key))
    with pytest.raises(AdmissionRefused, match="revoked"):  # a new identity with the key it joined with
        auth.join(join_request(PeerIdentity.generate(), accused_key))
    with pytest.raises(AdmissionRefused, match="revoked"):  # its current token no longer opens the members' API
        auth.check_member(token)
    with pytest.raises(AdmissionRefused, match="wrong run secret"):  # no credential, no news about revocations
        auth.join(join_request(accused_identity, accused_key, secret="guessed-secret-0123456789"))
    assert auth.join(join_request(honest, honest_key))["token"]

    store.close()
    auth, store = authority(tmp_path)  # a restarted monitor: the same SQLite file and authority key
    with pytest.raises(AdmissionRefused, match="revoked"):
        auth.join(join_request(accused_identity, accused_key))
    assert auth.join(join_request(honest, honest_key))["token"]
    [saved] = store.all()
    assert saved == decision and saved.as_dict()["evidence"][0] == {
        "reporter": decision.evidence[0]["reporter"],
        "epoch": 7,
        "rounds": 3,
        "score": 950.0,
    }
    store.close()


def test_the_api_metrics_and_dashboard_show_a_revocation_after_its_member_stopped_being_scored(tmp_path):
    """Over real HTTP: the revoked member is no longer in any score record (it left), yet /api/suspects still lists
    it as revoked, /api/revocations gives the evidence, /api/status and /metrics count it, the dashboard has a tile."""
    accused, honest = peer_id(PeerIdentity.generate()), peer_id(PeerIdentity.generate())
    store = RevocationStore(tmp_path / "history.sqlite")
    records = {b"reporter-1": record(7, {accused: 950.0, honest: 1.1}), b"reporter-2": record(8, {accused: 880.0})}
    [row] = [row for row in suspects(records.values()) if row.peer_id == accused]
    store.revoke(row, 3, 100.0, records)
    history = History(tmp_path / "history.sqlite")
    checkpoints = CheckpointStore(tmp_path / "ckpt", history, keep=2, run_key=RunKey.load_or_create(tmp_path / "k"))
    live = LiveState(run_id="revocations")
    live.suspects = tuple(suspects([record(9, {honest: 1.0}), record(9, {honest: 1.2})]))
    live.revocations, live.revoked_count = tuple(store.all()), store.count()
    server = ServerThread(create_app(live, history, checkpoints, make_registry(live, checkpoints)), "127.0.0.1", 0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        rows = {row["peer_id"]: row for row in http_json(url + "/api/suspects")}
        assert rows[honest]["revoked"] is False and rows[honest]["suspicious"] is False
        assert rows[accused] == {
            "peer_id": accused,
            "suspicion": 915.0,
            "reporters": 2,
            "suspicious": True,
            "revoked": True,
            "contributor": None,  # no member list in this live state: nothing ties the peer id to a signing key
        }
        [decision] = http_json(url + "/api/revocations")
        assert decision["peer_id"] == accused and decision["refreshes"] == 3 and decision["threshold"] == 100.0
        assert [(item["epoch"], item["score"]) for item in decision["evidence"]] == [(7, 950.0), (8, 880.0)]
        assert http_json(url + "/api/status")["revoked_members"] == 1
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert "albert_swarm_revoked_members 1.0" in metrics
        with urllib.request.urlopen(url + "/", timeout=10) as response:
            assert 'id="stat-revoked"' in response.read().decode()
    finally:
        server.stop()
        history.close()
        store.close()


def http_json(url: str, token: str | None = None):
    """GET a JSON route (with a member's token where given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return json.loads(response.read())


def test_every_decision_is_counted_and_the_newest_shown(tmp_path):
    store = RevocationStore(tmp_path / "history.sqlite")
    names = [f"QmAccused{letter}{digit}" for digit in "123" for letter in "ABCDEFGHJKLMNPQRSTUVWXYZ"]  # base58
    for index, accused in enumerate(names[: MAX_SHOWN + 6]):
        [row] = suspects([record(index, {accused: 500.0}), record(index, {accused: 600.0})])
        store.revoke(row, 3, 100.0, {b"reporter": record(index, {accused: 500.0})})
    shown = store.all()
    assert store.count() == MAX_SHOWN + 6 and len(shown) == MAX_SHOWN
    assert shown[0].peer_id == names[MAX_SHOWN + 5]  # newest first
    store.close()


def test_revoke_above_needs_a_closed_run(tmp_path):
    with pytest.raises(ValueError, match="--revoke-above needs a closed run"):
        MonitorConfig(run_dir=str(tmp_path), revoke_above=100.0)
    with pytest.raises(ValueError, match="revoke_after >= 1"):
        MonitorConfig(run_dir=str(tmp_path), revoke_after=0)


# --- a real closed run: monitor, three honest members and a sign flipper ------------------------------------------

TTL = 20.0  # short: the attacker's last token ends soon after the decision
ROBUST = ["--aggregation", "centered-clip"]
JOINED = re.compile(r"Joined run '[\w-]+' as (\w+)")
REVOKED = re.compile(r"Revoked member (\w+) of run 'closed'")
GROUP = re.compile(r"Averaged gradients with (\d+) peers")
DHT_REFUSED = re.compile(r"Refused a DHT request from a process without a valid access token")
EXPIRED = "STAYING after the token expired"  # tests/peer/byzantine.py --stay: where an honest peer would leave


class Attacker(Process):
    """tests/peer/byzantine.py as a member of the closed run (it joins with the run secret like an honest peer)."""

    def __init__(self, tmp_path: Path, initial_peers: list[str], join: list[str]):
        command = [
            sys.executable,
            "-m",
            "tests.peer.byzantine",
            "--attack",
            "sign-flip",
            "--from_epoch",
            "3",
            "--stay",
        ]
        command += ["--run_id", "closed", "--initial_peers", *initial_peers, *PEER_FLAGS, *ROBUST, *join]
        command += ["--backup_dir", str(tmp_path / "attacker" / "backups")]
        super().__init__("attacker", command, tmp_path / "attacker.log")

    def peer_id(self) -> str | None:
        found = re.search(r"^PEER_ID (\w+)$", self.log_text(), re.MULTILINE)
        return found.group(1) if found else None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sign_flipper_is_revoked_and_leaves_and_no_honest_member_is(tmp_path, processes):
    secret = tmp_path / "run.secret"
    secret.write_text(SECRET + "\n")
    revoke = ["--revoke_above", "100", "--revoke_after", "3", "--revoke_quorum", "2"]
    monitor_flags = ["--run_secret_file", str(secret), "--token_ttl", str(TTL), *ROBUST, *revoke]
    monitor = MonitorProcess(tmp_path / "monitor", "closed", monitor_flags)
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    join = ["--join_url", monitor.url, "--run_secret_file", str(secret)]
    honest = [PeerProcess(tmp_path, name, "closed", initial_peers, [*join, *ROBUST]) for name in "abc"]
    attacker = Attacker(tmp_path, initial_peers, join)
    processes.extend([*honest, attacker])

    wait_until(lambda: "ATTACK sign-flip" in attacker.log_text(), 400, f"the attack to start; {attacker.log_path}")
    attacker_id = attacker.peer_id()
    honest_ids = [wait_until(lambda peer=peer: JOINED.findall(peer.log_text()), 60, peer.name)[0] for peer in honest]
    wait_until(lambda: REVOKED.search(monitor.log_text()), 300, "the monitor to revoke a member")
    revoked_at = time.monotonic()
    assert REVOKED.findall(monitor.log_text()) == [attacker_id], monitor.log_text()[-3000:]
    line = next(line for line in monitor.log_text().splitlines() if "Revoked member" in line)
    print(line[:600])
    assert "above 100 for 3 refreshes" in line and " at epoch " in line

    # the evidence over HTTP, to members (the monitor's own admission is a member's token)
    token = encode_token(Authority(tmp_path / "monitor" / "authority.key", 60.0, str(secret)).issue(b"", "QmReader"))
    decisions = http_json(monitor.url + "/api/revocations", token)
    assert [decision["peer_id"] for decision in decisions] == [attacker_id]
    assert decisions[0]["suspicion"] > 100 and decisions[0]["reporters"] >= 2 and decisions[0]["evidence"]
    rows = {row["peer_id"]: row for row in http_json(monitor.url + "/api/suspects", token)}
    assert rows[attacker_id]["revoked"] and not any(rows[peer]["revoked"] for peer in honest_ids if peer in rows)
    # the attacker's contributor row (its progress records, signed with the key it proved at its join) says so too
    contributors = {row["peer_id"]: row for row in http_json(monitor.url + "/api/contributors", token)}
    attacker_row = contributors.get(rows[attacker_id]["contributor"])
    assert attacker_row and attacker_row["verdict"] == "revoked", (rows[attacker_id], list(contributors.values()))
    assert [row["verdict"] for row in contributors.values()].count("revoked") == 1
    assert monitor.get("/api/status")["revoked_members"] == 1

    # its token is not renewed; once it ended, the attacker (which stays: --stay) is no member for the others
    wait_until(lambda: EXPIRED in attacker.log_text(), TTL + 60, "the attacker's token to end unrenewed")
    print(f"the attacker's token ended {time.monotonic() - revoked_at:.0f} s after the decision")
    assert "The monitor refused to renew this peer's access token" in attacker.log_text()
    assert "revoked from this run" in attacker.log_text()
    time.sleep(5)  # the members' caches of the member list hold a token until it expires, not longer
    offsets, attacker_offset = [len(peer.log_text()) for peer in honest], len(attacker.log_text())

    # rounds of at least two members (a round needs two): on a loaded machine one member can trail the others for
    # minutes (each of its rounds finds no group, it downloads the state and is an epoch behind again; seen in CI)
    def averaging():
        return sum(rounds_since(peer, offset) >= 3 for peer, offset in zip(honest, offsets)) >= 2

    wait_until(averaging, 240, "rounds of at least two members")
    assert attacker.process.poll() is None, "the attacker died: nothing proves the members refuse it"
    for peer, offset in zip(honest, offsets):
        sizes = [int(size) for size in GROUP.findall(peer.log_text()[offset:])]
        assert not sizes or max(sizes) <= len(honest), f"{peer.name} averaged with the revoked attacker: {sizes}"
    # nor did the attacker average with anybody: the one proof that holds whichever side stopped the exchange
    attacker_sizes = [int(size) for size in GROUP.findall(attacker.log_text()[attacker_offset:])]
    assert not attacker_sizes or max(attacker_sizes) <= 1, f"the revoked attacker averaged: {attacker_sizes}"
    # how it was kept out depends on timing: members refuse its calls and decline to follow it as a leader, or its
    # own DHT refuses to send without a valid token, so it never reaches a member (then no member logs a refusal)
    refused = re.compile(
        rf"(?:Refused rpc_\w+ \(\w+\) from peer|Did not join the group of peer) {attacker_id}: "
        "it holds no valid access token"
    )
    refusals = [line for peer in honest for line in refused.findall(peer.log_text())]
    # a DHT refusal names no peer, but since the token ended the attacker is the one process here without a token
    refusals += [
        line for peer, offset in zip(honest, offsets) for line in DHT_REFUSED.findall(peer.log_text()[offset:])
    ]
    print(f"{len(refusals)} refusals of the attacker in the members' logs; its rounds since: {attacker_sizes}")
    assert REVOKED.findall(monitor.log_text()) == [attacker_id]  # and no honest member since
    for peer in honest:
        assert peer.process.poll() is None and "refused to renew" not in peer.log_text(), peer.log_text()[-2000:]


def rounds_since(peer: PeerProcess, offset: int) -> int:
    return len(GROUP.findall(peer.log_text()[offset:]))
