"""Closed runs, peer side: token checks, join credentials, and real DHTs that refuse a node without a token."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import threading
import time

import hivemind
import pytest
from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from peer.config import PeerConfig
from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.swarm.access import MembershipPublisher, RunAuthorizer
from peer.swarm.access import main as access_cli
from peer.swarm.access_tokens import (
    expiration_text,
    identity_peer_id,
    join_message,
    members_key,
    read_private_key,
    read_secrets,
    token_payload,
    verify_token,
)
from peer.swarm.join_client import JoinCredential, JoinRefused, JoinUnavailable
from peer.swarm.progress import local_public_key

AUTHORITY = RSAPrivateKey()
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def signed_token(username: str, public_key: bytes, lifetime: float, authority: RSAPrivateKey = AUTHORITY):
    expiration = expiration_text(get_dht_time() + lifetime)
    signature = authority.sign(token_payload(username, public_key, expiration))
    return AccessToken(username=username, public_key=public_key, expiration_time=expiration, signature=signature)


def own_token(peer_id: PeerID, lifetime: float = 300.0) -> AccessToken:
    """A token for this process's hivemind key (the one its DHT signs requests with)."""
    public_key = RSAPrivateKey.process_wide().get_public_key().to_bytes()
    return signed_token(peer_id.to_base58(), public_key, lifetime)


def test_token_verifies_until_it_expires_and_not_after_tampering():
    key = RSAPrivateKey().get_public_key().to_bytes()
    authority_key = AUTHORITY.get_public_key()
    token = signed_token("QmPeer", key, lifetime=60)
    assert verify_token(token, authority_key)
    assert not verify_token(token, authority_key, now=get_dht_time() + 61)  # expired
    assert not verify_token(token, RSAPrivateKey().get_public_key())  # another authority
    for field, value in [("username", "QmOther"), ("public_key", RSAPrivateKey().get_public_key().to_bytes())]:
        forged = AccessToken()
        forged.CopyFrom(token)
        setattr(forged, field, value)
        assert not verify_token(forged, authority_key), field
    prolonged = AccessToken()
    prolonged.CopyFrom(token)
    prolonged.expiration_time = expiration_text(get_dht_time() + 10**6)
    assert not verify_token(prolonged, authority_key)
    assert not verify_token(AccessToken(), authority_key)  # what a process without a token sends
    assert not verify_token(AccessToken(expiration_time="not a date"), authority_key)


def test_secret_proof_is_an_hmac_and_the_secret_file_is_checked(tmp_path):
    secret_file = tmp_path / "run.secret"
    secret_file.write_text("# rotated 2026-01\n" + "a" * 32 + "\n")
    message = join_message(b"ssh-rsa AAAA", "QmPeer", 1700000000)
    proof = JoinCredential(secret_file=str(secret_file)).proof(message)
    assert proof == {"hmac": hmac.new(b"a" * 32, message, hashlib.sha256).hexdigest()}
    assert "a" * 32 not in str(proof)  # the secret never travels
    secret_file.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_secrets(secret_file)
    secret_file.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="holds no secret"):
        read_secrets(secret_file)


def test_join_key_cli_creates_a_key_whose_signature_verifies(tmp_path, capsys):
    path = tmp_path / "join.key"
    assert access_cli(["new-join-key", str(path)]) == 0  # python -m peer.swarm.access new-join-key PATH
    line = capsys.readouterr().out.strip()
    assert line.startswith("ssh-rsa ") and oct(path.stat().st_mode)[-3:] == "600"
    assert access_cli(["new-join-key", str(path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert access_cli(["allowlist-line", str(path)]) == 0 and capsys.readouterr().out.strip() == line
    proof = JoinCredential(join_key_file=str(path)).proof(b"message")
    assert proof["join_key"] == line
    assert RSAPublicKey.from_bytes(line.encode()).verify(b"message", proof["signature"].encode())
    assert read_private_key(path).get_public_key().to_bytes().decode() == line


def test_peer_config_needs_a_monitor_and_one_credential(tmp_path):
    secret = tmp_path / "run.secret"
    secret.write_text("b" * 32)
    with pytest.raises(ValueError, match="needs --join-url"):
        PeerConfig(run_secret_file=str(secret))
    with pytest.raises(ValueError, match="needs a credential"):
        PeerConfig(join_url="http://127.0.0.1:8080")
    with pytest.raises(ValueError, match="not a file"):
        PeerConfig(join_url="http://127.0.0.1:8080", run_secret_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="http://host:port"):
        PeerConfig(join_url="127.0.0.1:8080", run_secret_file=str(secret))
    assert PeerConfig(join_url="http://127.0.0.1:8080", run_secret_file=str(secret)).closed_run
    assert not PeerConfig().closed_run


def test_authorizer_keeps_a_valid_token_while_the_monitor_is_down_and_gives_up_once_it_expired():
    attempts = []

    def monitor_down() -> AccessToken:
        attempts.append(1)
        raise JoinUnavailable("connection refused")

    token = own_token(PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"), lifetime=30)
    authorizer = RunAuthorizer("run", AUTHORITY.get_public_key(), monitor_down, token, refresh_margin=60)
    assert authorizer.does_token_need_refreshing(token)
    assert asyncio.run(authorizer.get_token()) is token
    assert asyncio.run(authorizer.get_token()) is token
    assert len(attempts) == 1  # the second call within the retry period did not wait on the monitor again

    authorizer._local_access_token = own_token(
        PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"), -1
    )
    authorizer._retry_at = 0.0
    with pytest.raises(PermissionError, match="expired"):
        asyncio.run(authorizer.get_token())


def test_a_request_from_a_skewed_clock_is_refused_naming_the_skew_not_the_token(monkeypatch, caplog):
    """hivemind refuses a request stamped over 60 s off like one without a token; the log line tells them apart."""
    member = own_token(PeerID.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"))

    def authorizer(token: AccessToken) -> RunAuthorizer:
        return RunAuthorizer("run", AUTHORITY.get_public_key(), lambda: token, token, refresh_margin=1)

    def request_signed_at(offset: float, token: AccessToken = member) -> dht_pb2.PingRequest:
        request = dht_pb2.PingRequest(validate=True)
        with monkeypatch.context() as patch:  # the sender's clock, `offset` seconds ahead of the receiver's
            patch.setattr("hivemind.utils.auth.get_dht_time", lambda: get_dht_time() + offset)
            asyncio.run(authorizer(token).sign_request(request, None))
        return request

    receiver = authorizer(member)
    with caplog.at_level(logging.WARNING, logger="peer.swarm.access"):
        assert asyncio.run(receiver.validate_request(request_signed_at(20.0)))  # within hivemind's minute
        assert not caplog.text
        assert not asyncio.run(receiver.validate_request(request_signed_at(-120.0)))
        assert re.search(r"member of run 'run' whose clock is 12\d s behind this one .*synchronize", caplog.text)
        assert "without a valid access token" not in caplog.text
        forged = signed_token(member.username, member.public_key, 300, authority=RSAPrivateKey())
        assert not asyncio.run(receiver.validate_request(request_signed_at(0.0, forged)))
        assert "from a process without a valid access token of run 'run'" in caplog.text


@pytest.mark.timeout(120)
def test_dht_refuses_a_node_without_a_token_and_serves_members(tmp_path):
    """Two admitted nodes share records; a node that knows their address but holds no token reads and writes nothing."""
    dhts = []
    try:
        for name in ("first", "second"):
            identity = str(tmp_path / f"{name}.key")
            peer_id = identity_peer_id(identity)
            token = own_token(peer_id)
            authorizer = RunAuthorizer("run", AUTHORITY.get_public_key(), lambda t=token: t, token, 100.0)
            initial = [str(maddr) for maddr in dhts[0].get_visible_maddrs()] if dhts else []
            dhts.append(
                hivemind.DHT(
                    initial_peers=initial,
                    start=True,
                    host_maddrs=LOOPBACK,
                    authorizer=authorizer,
                    identity_path=identity,
                    check_if_identity_free=False,
                )
            )
            assert dhts[-1].peer_id == peer_id
        first, second = dhts
        assert first.store("run_progress", b"epoch 3", get_dht_time() + 60)
        assert second.get("run_progress", latest=True).value == b"epoch 3"

        initial = [str(maddr) for maddr in first.get_visible_maddrs()]
        intruder = hivemind.DHT(
            initial_peers=initial, start=True, host_maddrs=LOOPBACK, ensure_bootstrap_success=False
        )
        dhts.append(intruder)
        assert intruder.get("run_progress", latest=True) is None
        intruder.store("run_progress", b"epoch 999", get_dht_time() + 60)  # it can only store in its own node
        assert first.get("run_progress", latest=True).value == b"epoch 3"
        assert second.get("run_progress", latest=True).value == b"epoch 3"

        check = MembershipCheck(second, "run", AUTHORITY.get_public_key())
        stored = first.store(
            members_key("run"),
            subkey=local_public_key(),
            value=own_token(first.peer_id).SerializeToString(),
            expiration_time=get_dht_time() + 60,
        )
        assert stored
        assert asyncio.run(check.admits(first.peer_id))
        assert not asyncio.run(check.admits(intruder.peer_id))
    finally:
        for dht in dhts:
            dht.shutdown()


def test_membership_check_ignores_forged_and_expired_tokens():
    check = MembershipCheck(None, "run", AUTHORITY.get_public_key())
    key = RSAPrivateKey().get_public_key().to_bytes()
    entries = {
        b"a": hivemind.utils.ValueWithExpiration(signed_token("QmGood", key, 60).SerializeToString(), 0),
        b"b": hivemind.utils.ValueWithExpiration(
            signed_token("QmForged", key, 60, RSAPrivateKey()).SerializeToString(), 0
        ),
        b"c": hivemind.utils.ValueWithExpiration(signed_token("QmExpired", key, -5).SerializeToString(), 0),
        b"d": hivemind.utils.ValueWithExpiration(b"\xff garbage", 0),
    }
    members = check.valid_members(hivemind.utils.ValueWithExpiration(entries, 0))
    assert set(members) == {"QmGood"}


@pytest.mark.timeout(120)
def test_member_entry_is_renewed_and_a_revoked_peer_is_told_to_leave():
    dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK)
    try:
        renewed = []

        def monitor() -> AccessToken:
            renewed.append(own_token(dht.peer_id, lifetime=4))
            return renewed[-1]

        publisher = MembershipPublisher(dht, "run", monitor, own_token(dht.peer_id, 4), refresh_margin=2).start()
        check = MembershipCheck(dht, "run", AUTHORITY.get_public_key())
        assert asyncio.run(check.admits(dht.peer_id))
        time.sleep(6)  # past the first token's expiry: only a renewed token keeps this peer a member
        publisher.stop()
        assert renewed and asyncio.run(MembershipCheck(dht, "run", AUTHORITY.get_public_key()).admits(dht.peer_id))

        left = threading.Event()

        def revoked() -> AccessToken:
            raise JoinRefused("wrong run secret (HTTP 403)")

        token = own_token(dht.peer_id, lifetime=1.5)
        publisher = MembershipPublisher(dht, "run", revoked, token, refresh_margin=2, on_expired=left.set).start()
        assert left.wait(timeout=10)
        publisher.stop()
    finally:
        dht.shutdown()
