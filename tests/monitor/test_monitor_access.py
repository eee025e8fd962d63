"""Closed runs: the monitor's authority and POST /api/join for real, the HTTP API closed to non-members, a skewed
clock told at admission, then a closed swarm that an intruder attacks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from monitor.access import Authority
from monitor.aggregate import PeerProgress, aggregate
from monitor.checkpoint import CheckpointStore
from monitor.config import MonitorConfig
from monitor.history import History
from monitor.http_guard import MAX_BODY_BYTES
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.server import ServerThread, create_app
from peer.swarm.access_tokens import (
    encode_token,
    expiration_text,
    join_message,
    read_private_key,
    token_payload,
    verify_token,
)
from peer.swarm.join_client import ClockSkewed, JoinClient, JoinCredential, JoinRefused, http_access_token
from peer.swarm.peer_identity import PeerIdentity
from tests.harness import wait_until
from tests.monitor.conftest import CHROMIUM, MonitorProcess, PeerProcess, Process, chromium
from tests.monitor.crafted_bodies import CRAFTED_BODIES
from tests.monitor.joining import forged_join

IDENTITY = PeerIdentity.generate()  # the joiner's libp2p identity
PEER_ID = IDENTITY.peer_id.to_base58()


def fill_checkpoint(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\x02" * 1024)
    (directory / "config.json").write_text('{"model_type": "lean_albert"}')


def populated_snapshot():
    report = PeerProgress("peer-a", epoch=3, samples_per_second=9.0, samples_accumulated=32, loss_sum=8.0,
                        mini_steps=4, time=time.time(), device="cpu")  # fmt: skip
    return aggregate([report], now=time.time())


def write_secret(path: Path, *secrets: str) -> Path:
    path.write_text("".join(secret + "\n" for secret in secrets))
    return path


@pytest.fixture
def closed_monitor(tmp_path):
    """The monitor's HTTP server with an authority admitting a run secret and an allowlisted join key."""
    secret_file = write_secret(tmp_path / "run.secret", "old-secret-0123456789")
    join_key = RSAPrivateKey()
    (tmp_path / "join.key").write_bytes(join_key.to_bytes())
    allowlist = tmp_path / "allowlist"
    allowlist.write_text("# Alice's GPU box\n" + join_key.get_public_key().to_bytes().decode() + " alice\n")
    authority = Authority(tmp_path / "run" / "authority.key", 60.0, str(secret_file), str(allowlist))
    history = History(tmp_path / "history.sqlite")
    store = CheckpointStore(tmp_path / "checkpoints", history, keep=2)
    store.write(3, fill_checkpoint, loss=2.5, samples_total=96)
    live = LiveState(run_id="closed", initial_peers=[], model={"name": "tiny"})
    live.update(populated_snapshot(), invalid=0, refused={"key-of-a-refused-peer": "model fingerprint differs"})
    app = create_app(live, history, store, make_registry(live, store), authority=authority)
    server = ServerThread(app, "127.0.0.1", 0)
    server.start()
    server.url, server.authority, server.dir = f"http://127.0.0.1:{server.port}", authority, tmp_path
    yield server
    server.stop()
    history.close()


def client(url: str, **credential) -> JoinClient:
    return JoinClient(url, JoinCredential(**credential), IDENTITY, private_key=RSAPrivateKey())


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/api/join", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_run_secret_admits_and_a_wrong_one_is_refused_with_a_reason(closed_monitor, caplog):
    joiner = client(closed_monitor.url, secret_file=str(closed_monitor.dir / "run.secret"))
    token = joiner()
    assert token.username == PEER_ID and joiner.ttl == 60.0
    assert verify_token(token, closed_monitor.authority.public_key)
    wrong = write_secret(closed_monitor.dir / "wrong.secret", "wrong-secret-0123456789")
    refusal = pytest.raises(JoinRefused, match=r"wrong run secret \(HTTP 403\)")
    with caplog.at_level(logging.WARNING, logger="monitor.access"), refusal:
        client(closed_monitor.url, secret_file=str(wrong))()
    assert f"Refused a join request from peer {PEER_ID}: wrong run secret" in caplog.text
    forged_line = "\nINFO monitor.access: Admitted peer QmEvil"  # a stranger's id never writes log lines
    with caplog.at_level(logging.WARNING, logger="monitor.access"):
        post(closed_monitor.url, json.dumps({"peer_id": "Qm" + forged_line, "timestamp": "x"}).encode())
    assert "Refused a join request from peer (unnamed)" in caplog.text and "QmEvil" not in caplog.text


def test_allowlisted_join_key_admits_and_an_unlisted_one_is_refused(closed_monitor, tmp_path):
    assert client(closed_monitor.url, join_key_file=str(closed_monitor.dir / "join.key"))().username == PEER_ID
    (tmp_path / "other.key").write_bytes(RSAPrivateKey().to_bytes())
    with pytest.raises(JoinRefused, match="not in the run's allowlist"):
        client(closed_monitor.url, join_key_file=str(tmp_path / "other.key"))()


def test_a_join_must_prove_the_key_and_the_peer_id_it_names(closed_monitor):
    """Over real HTTP, with the right run secret: naming another peer's RSA key or peer id (keys are public, the
    HMAC is right) is refused, as is a request without the proofs (a peer older than this monitor)."""
    secret, member = "old-secret-0123456789", RSAPrivateKey()
    other_key = RSAPrivateKey().get_public_key().to_bytes()
    own_key = member.get_public_key().to_bytes()
    other_peer = PeerIdentity.generate().peer_id.to_base58()
    cases = [
        (forged_join(IDENTITY, member, secret, other_key, PEER_ID), "'key_signature' is not a signature"),
        (
            forged_join(IDENTITY, member, secret, own_key, other_peer),
            f"'peer_key' is not the key of peer id {other_peer}",
        ),
    ]
    unproven = forged_join(IDENTITY, member, secret, own_key, PEER_ID)
    for field in ("key_signature", "peer_key", "peer_signature"):
        del unproven[field]
    cases.append((unproven, "does not prove that it holds its keys"))
    for body, refusal in cases:
        status, answer = post(closed_monitor.url, json.dumps(body).encode())
        assert status == 403 and refusal in answer["detail"], (status, answer)
    assert (
        post(closed_monitor.url, json.dumps(forged_join(IDENTITY, member, secret, own_key, PEER_ID)).encode())[0]
        == 200
    )


def test_garbage_and_forged_join_requests_get_4xx_not_500(closed_monitor):
    listed = read_private_key(closed_monitor.dir / "join.key")
    public_key = RSAPrivateKey().get_public_key().to_bytes().decode()
    now = int(get_dht_time())
    stale_proof = hmac.new(b"old-secret-0123456789", join_message(public_key.encode(), PEER_ID, now - 600), "sha256")
    garbage = [
        b"not json",
        b"[1, 2]",
        b"{}",
        json.dumps({"peer_id": PEER_ID, "public_key": public_key, "timestamp": "now", "hmac": "00"}).encode(),
        json.dumps({"peer_id": PEER_ID, "public_key": "x" * 10**4, "timestamp": now, "hmac": "00"}).encode(),
        json.dumps({"peer_id": "not-a-peer-id", "public_key": public_key, "timestamp": now, "hmac": "00"}).encode(),
        json.dumps({"peer_id": PEER_ID, "public_key": "ssh-rsa !!", "timestamp": now, "hmac": "00"}).encode(),
        json.dumps({"peer_id": PEER_ID, "public_key": public_key, "timestamp": now}).encode(),
        json.dumps({"peer_id": PEER_ID, "public_key": public_key, "timestamp": now - 600, "hmac": stale_proof.hexdigest()}).encode(),
        json.dumps({"peer_id": PEER_ID, "public_key": public_key, "timestamp": now,
                    "join_key": listed.get_public_key().to_bytes().decode(), "signature": "Zm9yZ2Vk"}).encode(),
    ]  # fmt: skip
    reasons = []
    for body in garbage:
        status, answer = post(closed_monitor.url, body)
        unparsable = body in (b"not json", b"[1, 2]")  # not a JSON object: 400; a refused request: 403
        assert status == (400 if unparsable else 403), (body[:100], answer)
        reasons.append(answer["detail"])
    assert re.search(r"60[01] s behind the monitor's clock \(at most 60 s allowed\)", reasons[-2]), reasons[-2]
    assert "signature does not match" in reasons[-1]


def test_secret_rotates_without_a_restart(closed_monitor):
    secret_file = closed_monitor.dir / "run.secret"
    old = write_secret(closed_monitor.dir / "peer-old.secret", "old-secret-0123456789")
    new = write_secret(closed_monitor.dir / "peer-new.secret", "new-secret-0123456789-rotated")
    with pytest.raises(JoinRefused, match="wrong run secret"):
        client(closed_monitor.url, secret_file=str(new))()
    write_secret(secret_file, "old-secret-0123456789", "new-secret-0123456789-rotated")  # step 1: both valid
    client(closed_monitor.url, secret_file=str(new))()
    client(closed_monitor.url, secret_file=str(old))()
    write_secret(secret_file, "new-secret-0123456789-rotated")  # step 2: peers moved, the old one is removed
    client(closed_monitor.url, secret_file=str(new))()
    with pytest.raises(JoinRefused, match="wrong run secret"):
        client(closed_monitor.url, secret_file=str(old))()
    secret_file.write_text("")  # a broken edit keeps the last good secrets instead of locking everyone out
    client(closed_monitor.url, secret_file=str(new))()


def test_authority_key_is_kept_across_restarts(tmp_path):
    secret = write_secret(tmp_path / "run.secret", "a-secret-0123456789")
    first = Authority(tmp_path / "authority.key", 60.0, str(secret))
    token = first.issue(b"ssh-rsa AAAA", PEER_ID)
    second = Authority(tmp_path / "authority.key", 60.0, str(secret))
    assert verify_token(token, second.public_key)
    assert oct((tmp_path / "authority.key").stat().st_mode)[-3:] == "600"
    (tmp_path / "broken.key").write_bytes(b"not a key")
    with pytest.raises(ValueError, match="is not an authority key"):
        Authority(tmp_path / "broken.key", 60.0, str(secret))


def test_open_run_has_no_join_and_config_checks_access_flags(tmp_path):
    history = History(tmp_path / "history.sqlite")
    store = CheckpointStore(tmp_path / "checkpoints", history, keep=2)
    live = LiveState(run_id="open", initial_peers=[], model={"name": "tiny"})
    server = ServerThread(create_app(live, history, store, make_registry(live, store)), "127.0.0.1", 0)
    server.start()
    try:
        status, answer = post(f"http://127.0.0.1:{server.port}", b"{}")
        assert status == 404 and "open" in answer["detail"]
    finally:
        server.stop()
        history.close()
    assert not MonitorConfig().closed_run
    assert MonitorConfig(run_secret_file=str(write_secret(tmp_path / "s", "x" * 20))).closed_run
    with pytest.raises(ValueError, match="not a file"):
        MonitorConfig(allowlist_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="token_ttl"):
        MonitorConfig(token_ttl=1)


# --- a closed run is closed over HTTP too ---------------------------------------------------------------------------

PROTECTED = ["/checkpoints/latest", "/checkpoints/3", "/api/checkpoints", "/api/peers", "/api/history"]
PROTECTED += ["/api/suspects", "/api/revocations", "/api/contributors"]  # who is accused or revoked: members only
PUBLIC = ["/", "/static/dashboard.js", "/healthz", "/api/status", "/metrics", "/openapi.json"]


def fetch(url: str, authorization: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": authorization} if authorization else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def forged_tokens(authority_key: RSAPrivateKey) -> dict[str, str]:
    """Bearer values a non-member might try: garbage, a token of another authority, an expired one of this one."""

    def token(signer: RSAPrivateKey, lifetime: float) -> str:
        public_key = RSAPrivateKey().get_public_key().to_bytes()
        expiration = expiration_text(get_dht_time() + lifetime)
        signature = signer.sign(token_payload(PEER_ID, public_key, expiration))
        return "Bearer " + encode_token(
            AccessToken(username=PEER_ID, public_key=public_key, expiration_time=expiration, signature=signature)
        )

    return {
        "garbage": "Bearer not-a-token",
        "not base64 protobuf": "Bearer " + base64.b64encode(b"\xff" * 64).decode(),
        "huge": "Bearer " + "A" * 9000,
        "foreign authority": token(RSAPrivateKey(), 600),
        "expired": token(authority_key, -5),
    }


def assert_closed_over_http(url: str, authority_key: RSAPrivateKey, secret_file: Path) -> None:
    """Every protected path: 401 without a credential, 403 with a bad one, 200 with a member's token."""
    member = http_access_token(url, JoinCredential(secret_file=str(secret_file)))
    for path in PROTECTED:
        for authorization in (None, "Basic dXNlcjpwYXNz", "Bearer "):
            status, headers, body = fetch(url + path, authorization)
            assert status == 401, (path, authorization, status, body[:200])
            assert headers["www-authenticate"].startswith("Bearer") and b"POST /api/join" in body
        for name, authorization in forged_tokens(authority_key).items():
            status, _, body = fetch(url + path, authorization)
            assert status == 403, (path, name, status, body[:200])
        status, headers, body = fetch(url + path, member)
        assert status == 200, (path, body[:200])
        if path.startswith("/checkpoints/"):
            assert headers["x-checkpoint-sha256"] == hashlib.sha256(body).hexdigest()
    _, _, body = fetch(url + "/api/peers", forged_tokens(authority_key)["expired"])
    assert "expired" in json.loads(body)["detail"]


def assert_public_parts_public(url: str) -> None:
    for path in PUBLIC:
        assert fetch(url + path)[0] == 200, path
    status = json.loads(fetch(url + "/api/status")[2])
    assert status["closed_run"] and "refused_peers" not in status and status["epoch"] >= 0
    metrics = fetch(url + "/metrics")[2].decode()
    assert "albert_swarm_epoch " in metrics and "albert_swarm_peer_" not in metrics and "peer_id" not in metrics


def test_closed_run_serves_checkpoints_peers_and_history_to_members_only(closed_monitor):
    assert_closed_over_http(
        closed_monitor.url, closed_monitor.authority.private_key, closed_monitor.dir / "run.secret"
    )
    assert_public_parts_public(closed_monitor.url)
    # a peer's own DHT token is a member's credential too, and the OpenAPI schema declares the refusals
    token = client(closed_monitor.url, join_key_file=str(closed_monitor.dir / "join.key"))()
    assert fetch(closed_monitor.url + "/api/peers", "Bearer " + encode_token(token))[0] == 200
    paths = json.loads(fetch(closed_monitor.url + "/openapi.json")[2])["paths"]
    for path in PROTECTED[1:]:
        route = "/checkpoints/{epoch}" if path == "/checkpoints/3" else path
        assert {"401", "403"} <= set(paths[route]["get"]["responses"]), route


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package 'chromium' is not installed (apt-get install chromium)")
@pytest.mark.timeout(240)
def test_the_dashboard_of_a_closed_run_shows_the_summary_and_a_members_only_note(closed_monitor, tmp_path):
    dom = chromium(closed_monitor.url + "/", tmp_path, "--dump-dom")
    assert 'id="run-id">closed<' in dom and 'id="stat-peers">1<' in dom and 'class="badge ok"' in dom
    assert dom.count("members only (closed run)") == 6 + 4  # six charts; peers, checkpoints, contributors, suspects
    assert "peer-a" not in dom and 'href="/checkpoints/' not in dom


def test_open_run_serves_everything_without_a_credential(tmp_path):
    history = History(tmp_path / "history.sqlite")
    store = CheckpointStore(tmp_path / "checkpoints", history, keep=2)
    store.write(3, fill_checkpoint)
    live = LiveState(run_id="open", initial_peers=[], model={"name": "tiny"})
    live.update(populated_snapshot(), invalid=0, refused={"key-x": "model fingerprint differs"})
    server = ServerThread(create_app(live, history, store, make_registry(live, store)), "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        for path in PROTECTED + PUBLIC:
            assert fetch(url + path)[0] == 200, path
        assert json.loads(fetch(url + "/api/status")[2])["refused_peers"] == {"key-x": "model fingerprint differs"}
        assert 'albert_swarm_peer_epoch{peer_id="peer-a"} 3.0' in fetch(url + "/metrics")[2].decode()
        assert "401" not in json.loads(fetch(url + "/openapi.json")[2])["paths"]["/api/peers"]["get"]["responses"]
    finally:
        server.stop()
        history.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_closed_monitor_process_serves_members_only_and_survives_crafted_bodies(tmp_path, processes):
    """`python -m monitor --run_secret_file` for real: the same HTTP checks, then hostile bodies; it stays up."""
    run_dir = tmp_path / "monitor"
    history = History(run_dir / "history.sqlite")  # a checkpoint from an earlier life of the run
    CheckpointStore(run_dir / "checkpoints", history).write(3, fill_checkpoint, loss=2.5, samples_total=96)
    history.close()
    secret = write_secret(tmp_path / "run.secret", "process-run-secret-0123456789")
    monitor = MonitorProcess(run_dir, "closed-http", ["--run_secret_file", str(secret)])
    processes.append(monitor)
    monitor.wait_ready()
    assert_closed_over_http(monitor.url, read_private_key(run_dir / "authority.key"), secret)
    assert_public_parts_public(monitor.url)
    for name, body in CRAFTED_BODIES.items():
        status, answer = post(monitor.url, body)
        assert status in (400, 403), (name, status, answer)
    status, answer = post(monitor.url, b"{" * (MAX_BODY_BYTES + 1))
    assert status == 413 and "over the limit" in answer["detail"]
    assert monitor.process.poll() is None and monitor.get("/healthz")["status"] == "ok"
    assert "Traceback" not in monitor.log_text()


# --- clock skew, told at admission ------------------------------------------------------------------------------


def skewed_client(url: str, secret_file: Path, offset: float) -> JoinClient:
    """A JoinClient on a machine whose clock is `offset` seconds ahead (the system clock itself cannot be moved)."""
    credential = JoinCredential(secret_file=str(secret_file))
    return JoinClient(url, credential, IDENTITY, private_key=RSAPrivateKey(), clock=lambda: time.time() + offset)


def test_a_skewed_clock_is_warned_about_once_and_refused_where_tokens_would_fail(closed_monitor, caplog):
    secret = closed_monitor.dir / "run.secret"
    in_sync = skewed_client(closed_monitor.url, secret, 0.0)
    with caplog.at_level(logging.INFO, logger="peer.swarm.join_client"):
        in_sync()
        assert abs(in_sync.skew) < 2 and "clock" not in caplog.text
        drifting = skewed_client(closed_monitor.url, secret, 12.0)
        for _ in range(3):  # renewals at the same skew: one warning
            drifting()
        assert caplog.text.count("s ahead of the monitor's: tokens still work") == 1
        assert drifting.skew == pytest.approx(-12.0, abs=1.0)
        drifting.clock = time.time  # an NTP sync: said once, and a later drift is warned about again
        drifting()
        assert "back within 5 s" in caplog.text

    # the monitor admits it (45 s < its 60 s), but members would refuse a peer 45 s off theirs on the other side
    for offset, direction in ((45.0, "ahead of"), (-45.0, "behind")):
        with pytest.raises(ClockSkewed, match=rf"clock is 4[45]\.\d s {direction} the monitor's.*NTP"):
            skewed_client(closed_monitor.url, secret, offset)()
    # further off, the monitor refuses the join and names the skew it saw
    with pytest.raises(JoinRefused, match=r"(89|90) s ahead of the monitor's clock \(at most 60 s allowed\).*NTP"):
        skewed_client(closed_monitor.url, secret, 90.0)()
    with pytest.raises(JoinRefused, match=r"360[01] s behind the monitor's clock"):
        skewed_client(closed_monitor.url, secret, -3600.0)()


# --- a closed swarm: real monitor, honest peers, a refused peer and an intruder, all separate processes -------------

TTL = 20.0  # short, so tokens are renewed several times during the test (at half their lifetime)
JOINED = re.compile(r"Joined run '[\w-]+' as (\w+)")
GUARDED_RPCS = ("rpc_join_group", "rpc_aggregate_part", "rpc_download_state")


def peer_id_of(peer: PeerProcess) -> str:
    return wait_until(lambda: (JOINED.findall(peer.log_text()) or [None])[0], 150, f"{peer.name} to join")


def backup(peer: PeerProcess, epoch: int) -> torch.Tensor:
    parameters = torch.load(peer.backup_dir / f"epoch-{epoch:06d}.pt", weights_only=True)["model"]
    return torch.cat([tensor.flatten().float() for tensor in parameters.values()])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_closed_run_trains_refuses_a_wrong_secret_and_an_intruder(tmp_path, processes):
    secret = write_secret(tmp_path / "run.secret", "closed-run-secret-0123456789")
    wrong = write_secret(tmp_path / "wrong.secret", "guessed-secret-0123456789")
    monitor_flags = ["--run_secret_file", str(secret), "--token_ttl", str(TTL)]
    monitor = MonitorProcess(tmp_path / "monitor", "closed", monitor_flags)
    processes.append(monitor)
    initial_peers = monitor.wait_ready()
    join = ["--join_url", monitor.url, "--run_secret_file"]
    exact = ["--grad_compression", "none"]  # the peers' parameters then agree closely (see tests/peer/test_swarm.py)
    honest = [PeerProcess(tmp_path, name, "closed", initial_peers, [*join, str(secret), *exact]) for name in "ab"]
    refused = PeerProcess(tmp_path, "refused", "closed", initial_peers, [*join, str(wrong)])
    processes.extend([*honest, refused])

    assert refused.process.wait(timeout=150) == 2
    assert "The monitor refused to admit this peer: wrong run secret" in refused.log_text()
    wait_until(lambda: "Refused a join request from peer" in monitor.log_text(), 30, "the monitor's refusal line")

    # the worst case: the intruder knows the run id, the initial peers and every member's peer id
    members = [peer_id_of(peer) for peer in honest] + [initial_peers[0].rsplit("/", 1)[1]]
    admitted_at = time.monotonic()
    wait_until(lambda: all("Starting at epoch" in peer.log_text() for peer in honest), 150, "the peers' averagers")
    command = [sys.executable, "tests/peer/intruder.py", "--run_id", "closed", "--initial_peers", *initial_peers]
    intruder = Process("intruder", [*command, "--targets", *members], tmp_path / "intruder.log")
    processes.append(intruder)
    # meanwhile: tokens live TTL seconds, the run must go on past two lifetimes (renewed over HTTP and locally)
    wait_until(lambda: time.monotonic() - admitted_at > 2 * TTL, 3 * TTL, "two token lifetimes")
    assert intruder.process.wait(timeout=150) == 0, intruder.log_text()[-3000:]
    attack = intruder.log_text()
    assert "ACCEPTED" not in attack and attack.count("REFUSED") == 4 + 5 * 3, attack
    for member in members[:2]:
        for rpc in ("rpc_join_group", "rpc_aggregate_part"):  # the code only the guard answers with
            assert f"REFUSED {rpc} at {member}: code PROTOCOL_VIOLATION" in attack, attack

    def refusals_logged() -> bool:
        logs = [peer.log_text() for peer in honest]
        dht_line = "Refused a DHT request from a process without a valid access token of run 'closed'"
        return all(f"Refused {rpc} " in log and dht_line in log for log in logs for rpc in GUARDED_RPCS)

    wait_until(refusals_logged, 30, "the honest peers' refusal lines")
    assert "Refused rpc_download_state " in monitor.log_text()

    reached = [max(peer.backup_epochs(), default=0) for peer in honest]
    wait_until(
        lambda: all(max(peer.backup_epochs(), default=0) > epoch for peer, epoch in zip(honest, reached)),
        120,
        "training to go on",
    )
    logs = [process.log_text() for process in (*honest, monitor)]  # before the shutdown, when members part
    for process in [*honest, monitor]:
        process.process.terminate()  # all at once: each takes seconds to leave
    for log in logs:
        assert "Could not renew" not in log and "refused to renew" not in log
        # a member refused access, or its state refused; a slow donor's download given up under load is neither
        refused = [
            line
            for line in log.splitlines()
            for member in members
            if f"from peer {member}:" in line and "Gave up the state download" not in line
        ]
        assert not refused, f"a member was refused: {refused[:3]}"
    for log in logs[:2]:  # the honest peers went on averaging with each other after the attack
        after = log[log.index("Refused rpc_aggregate_part") :]
        assert "Averaged gradients with 2 peers" in after or "Averaged parameters with 2 peers" in after
    for peer in honest:
        for epoch in peer.backup_epochs():
            assert torch.isfinite(backup(peer, epoch)).all() and backup(peer, epoch).abs().max() < 1e3
