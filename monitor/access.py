"""Closed runs, monitor side: the run's authority key, and admitting peers that prove a credential.

A credential is the HMAC of a shared run secret (one of the lines of the secret file) or the signature of a join key
listed in the allowlist file. Both files are re-read when they change, so secrets rotate without a restart. A request
also proves that its sender holds the RSA key and the libp2p identity it names (peer/swarm/peer_identity.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from pathlib import Path

from google.protobuf.message import DecodeError
from hivemind.p2p import PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from monitor.revocation import RevocationStore
from peer.swarm.access import RunAccess
from peer.swarm.access_tokens import (
    RateLimitedWarning,
    decode_token,
    encode_token,
    expiration_text,
    identity_peer_id,
    join_message,
    read_private_key,
    read_secrets,
    token_payload,
    token_problem,
    write_private_key,
)
from peer.swarm.clock import MAX_CLOCK_SKEW
from peer.swarm.peer_identity import peer_proof_problem

logger = logging.getLogger(__name__)
POSSESSION_FIELDS = ("key_signature", "peer_key", "peer_signature")
MAX_FIELD_CHARS = 4096  # a join request's fields are a few hundred characters; anything far larger is abuse
MAX_TIMESTAMP = 2**53  # a unix time in seconds is far below; the bound keeps float arithmetic on it exact
BASE58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,100}")  # the alphabet of libp2p peer ids
MAX_TOKEN_CHARS = 8192  # an encoded access token is about 1 KB


class AdmissionRefused(ValueError):
    """A join request without a valid credential; the message says why (it is sent back to the peer)."""


class WatchedFile:
    """A file parsed again whenever its modification time or size changes; a broken edit keeps the last good parse.

    Args:
        path: the file.
        parse: turns the file into its value (raises ValueError or OSError if the file is unusable).
    """

    def __init__(self, path: str | Path, parse):
        self.path, self.parse = Path(path), parse
        self._seen, self._lock = None, threading.Lock()
        self.value = parse(self.path)  # at start a bad file is the user's error: let it raise
        self._seen = self._signature()

    def _signature(self):
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    def current(self):
        with self._lock:
            signature = self._signature()
            if signature is not None and signature != self._seen:
                self._seen = signature
                try:
                    self.value = self.parse(self.path)
                    logger.info(f"Re-read {self.path}")
                except (ValueError, OSError) as error:
                    logger.error(f"Keeping the previous contents of {self.path}: {error}")
            return self.value


def read_allowlist(path: Path) -> set[bytes]:
    """Public keys of the allowlist file: 'ssh-rsa AAAA... [comment]' lines, as `python -m peer.swarm.access` prints."""
    keys = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            keys.add(RSAPublicKey.from_bytes(" ".join(words[:2]).encode()).to_bytes())
        except (ValueError, IndexError) as error:
            raise ValueError(f"{path}, line {number}: not an RSA public key ({error})") from error
    return keys


class Authority:
    """Issues the run's access tokens and decides who gets one.

    Args:
        key_path: the authority's private key, created on first start and reused (tokens survive a restart).
        token_ttl: seconds a token is valid.
        secret_file: file of run secrets, one a line (several during a rotation).
        allowlist_file: file of allowed join keys' public keys, one a line.
        revocations: the revoked members (monitor/revocation.py): no token for their peer id, key or join key.
    """

    def __init__(
        self,
        key_path: Path,
        token_ttl: float,
        secret_file: str | None = None,
        allowlist_file: str | None = None,
        revocations: RevocationStore | None = None,
    ):
        if not secret_file and not allowlist_file:
            raise ValueError("a closed run needs a run secret file or an allowlist file")
        self.private_key = load_or_create_key(key_path)
        self.public_key = self.private_key.get_public_key()
        self.token_ttl = token_ttl
        self.secrets = WatchedFile(secret_file, read_secrets) if secret_file else None
        self.allowlist = WatchedFile(allowlist_file, read_allowlist) if allowlist_file else None
        self.revocations = revocations
        self._refusals = RateLimitedWarning(logger, period=10.0)

    def issue(self, public_key: bytes, peer_id: str) -> AccessToken:
        """A token for this RSA key and libp2p peer id, valid for ``token_ttl`` seconds from now."""
        expiration = expiration_text(get_dht_time() + self.token_ttl)
        signature = self.private_key.sign(token_payload(peer_id, public_key, expiration))
        return AccessToken(username=peer_id, public_key=public_key, expiration_time=expiration, signature=signature)

    def token_source(self, peer_id: PeerID, private_key: RSAPrivateKey | None = None):
        """A function issuing tokens for this process (the monitor itself needs one for its DHT and averager)."""
        public_key = (private_key or RSAPrivateKey.process_wide()).get_public_key().to_bytes()
        return lambda: self.issue(public_key, peer_id.to_base58())

    def join(self, request: object) -> dict:
        """Answer a join request (parsed JSON) with a token, or raise AdmissionRefused saying why (logged here too)."""
        peer = request.get("peer_id") if isinstance(request, dict) else None
        try:
            public_key, peer_id = self._admit(request)
        except AdmissionRefused as error:
            # a stranger's string goes into the log only if it looks like a peer id: no forged lines, no escapes
            label = peer if isinstance(peer, str) and BASE58.fullmatch(peer) else "(unnamed)"
            self._refusals(label, f"Refused a join request from peer {label}: {error}")
            raise
        token = self.issue(public_key, peer_id)
        return {
            "token": encode_token(token),
            "authority_key": self.public_key.to_bytes().decode(),
            "ttl": self.token_ttl,
            "monitor_time": get_dht_time(),  # the peer compares it with its clock (peer/swarm/join_client.py)
        }

    def check_member(self, text: str) -> AccessToken:
        """The access token of an HTTP request (base64, as /api/join issues it), or AdmissionRefused saying why.

        Any unexpired token this authority signed is a member's: a peer's own DHT token works as well as one that
        `http_access_token` got for a downloader.
        """
        if len(text) > MAX_TOKEN_CHARS:
            raise AdmissionRefused(f"the access token is over {MAX_TOKEN_CHARS} characters: not one of this run's")
        try:
            token = decode_token(text)
        except (ValueError, DecodeError) as error:
            raise AdmissionRefused(f"the credential is not an access token ({type(error).__name__})") from error
        problem = token_problem(token, self.public_key)
        if problem is None and self.revocations is not None:
            problem = self.revocations.refusal(token.username, b"")  # the peer id is what a token vouches for
        if problem is not None:
            raise AdmissionRefused(problem)
        return token

    def _admit(self, request: object) -> tuple[bytes, str]:
        fields = _request_fields(request)
        public_key, peer_id, timestamp = fields["public_key"].encode(), fields["peer_id"], request["timestamp"]
        try:
            RSAPublicKey.from_bytes(public_key)
            PeerID.from_base58(peer_id)
        except Exception as error:  # the key and id parsers raise several types on garbage
            raise AdmissionRefused(f"malformed public key or peer id ({type(error).__name__})") from error
        skew = timestamp - get_dht_time()
        if abs(skew) > MAX_CLOCK_SKEW:
            direction = "ahead of" if skew > 0 else "behind"
            raise AdmissionRefused(
                f"the request's time is {abs(skew):.0f} s {direction} the monitor's clock (at most "
                f"{MAX_CLOCK_SKEW:.0f} s allowed): synchronize this machine's clock (NTP, e.g. timedatectl set-ntp true)"
            )
        message = join_message(public_key, peer_id, timestamp)
        if "hmac" in fields:
            self._check_secret(fields["hmac"], message)
        elif "join_key" in fields:
            self._check_join_key(fields["join_key"], fields.get("signature", ""), message)
        else:
            raise AdmissionRefused("the request carries no credential (hmac or join_key)")
        # after the credential check: a stranger learns nothing from which proof failed
        self._check_possession(fields, public_key, peer_id, message)
        if self.revocations is not None:
            # after the credential check: only a member proving its credential learns that it was revoked
            # keys in one canonical form: another spelling of a revoked key is the same key
            key = RSAPublicKey.from_bytes(public_key).to_bytes()
            join_key = RSAPublicKey.from_bytes(fields["join_key"].encode()).to_bytes() if "join_key" in fields else b""
            revoked = self.revocations.refusal(peer_id, key, join_key)
            if revoked is not None:
                raise AdmissionRefused(revoked)
            self.revocations.joined(peer_id, key, join_key)
        return public_key, peer_id

    @staticmethod
    def _check_possession(fields: dict, public_key: bytes, peer_id: str, message: bytes) -> None:
        """The sender holds the RSA key and the identity of the peer id it names (peer/swarm/peer_identity.py): a
        member may not claim another member's key or peer id, which its votes and suspicion are keyed by."""
        missing = [name for name in POSSESSION_FIELDS if name not in fields]
        if missing:
            raise AdmissionRefused(
                f"the request does not prove that it holds its keys (no {', '.join(missing)}): "
                "a peer older than this monitor? update it"
            )
        if not RSAPublicKey.from_bytes(public_key).verify(message, fields["key_signature"].encode()):
            raise AdmissionRefused("'key_signature' is not a signature of this request by its 'public_key'")
        problem = peer_proof_problem(peer_id, fields["peer_key"], message, fields["peer_signature"])
        if problem is not None:
            raise AdmissionRefused(problem)

    def _check_secret(self, offered: str, message: bytes) -> None:
        if self.secrets is None:
            raise AdmissionRefused("this run admits allowlisted join keys only, not a run secret")
        for secret in self.secrets.current():
            expected = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
            if hmac.compare_digest(expected, offered):
                return
        raise AdmissionRefused("wrong run secret")

    def _check_join_key(self, join_key: str, signature: str, message: bytes) -> None:
        if self.allowlist is None:
            raise AdmissionRefused("this run admits peers with the run secret only, not join keys")
        try:
            key = RSAPublicKey.from_bytes(join_key.encode())
        except Exception as error:
            raise AdmissionRefused(f"malformed join key ({type(error).__name__})") from error
        if key.to_bytes() not in self.allowlist.current():
            raise AdmissionRefused("this join key is not in the run's allowlist")
        if not key.verify(message, signature.encode()):
            raise AdmissionRefused("the join key's signature does not match the request")


def _request_fields(request: object) -> dict:
    """The string fields of a join request, checked for type and size (AdmissionRefused otherwise)."""
    if not isinstance(request, dict):
        raise AdmissionRefused("a join request is a JSON object")
    timestamp = request.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or abs(timestamp) > MAX_TIMESTAMP:
        raise AdmissionRefused("the request needs an integer 'timestamp' (unix seconds, at most 2**53)")
    names = ("peer_id", "public_key", "hmac", "join_key", "signature", *POSSESSION_FIELDS)
    fields = {name: request[name] for name in names if request.get(name) is not None}
    for name in ("peer_id", "public_key"):
        if name not in fields:
            raise AdmissionRefused(f"the request needs '{name}'")
    for name, value in fields.items():
        if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
            raise AdmissionRefused(f"'{name}' must be a string of at most {MAX_FIELD_CHARS} characters")
    return fields


def load_or_create_key(path: Path) -> RSAPrivateKey:
    """The authority's key from its file, or a new one written there (readable by the owner only)."""
    path = Path(path)
    if path.exists():
        try:
            return read_private_key(path)
        except ValueError as error:
            raise ValueError(f"{path} is not an authority key ({error}); move it away to make a new one") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    key = RSAPrivateKey()
    write_private_key(path, key)
    logger.info(f"Created the run's authority key in {path}")
    return key


def monitor_access(authority: Authority, run_id: str, identity_path: str | Path) -> RunAccess:
    """The monitor's own access to its closed run: tokens it issues to itself for the identity its DHT runs as."""
    peer_id = identity_peer_id(identity_path)
    fetch_token = authority.token_source(peer_id)
    return RunAccess(
        run_id, peer_id, str(identity_path), fetch_token, fetch_token(), authority.public_key, authority.token_ttl
    )
