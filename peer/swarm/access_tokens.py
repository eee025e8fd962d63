"""Closed runs: what an access token and a join credential are, and the files that hold keys and secrets.

A token names a peer (libp2p id) and its RSA key until an expiry, signed by the run's authority (the monitor).
"""

from __future__ import annotations

import base64
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from hivemind.p2p import P2P, PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

MEMBERS_FIELD = "members"


def members_key(run_id: str) -> str:
    """DHT key of the run's member list: one subkey per admitted peer holding its current access token."""
    return f"{run_id}_{MEMBERS_FIELD}"


def token_payload(username: str, public_key: bytes, expiration_time: str) -> bytes:
    """The bytes the authority signs: who (libp2p peer id), with which RSA key, until when."""
    return b"\n".join([b"albert-swarm access token", username.encode(), public_key, expiration_time.encode()])


def join_message(public_key: bytes, peer_id: str, timestamp: int) -> bytes:
    """The bytes a join credential proves knowledge of (an HMAC with the secret, or a join key's signature)."""
    return b"\n".join([b"albert-swarm join", public_key, peer_id.encode(), str(timestamp).encode()])


def token_expiry(token: AccessToken) -> float:
    """Expiry of a token as a unix time; ValueError if the field is malformed."""
    return datetime.fromisoformat(token.expiration_time).timestamp()


def expiration_text(expiry: float) -> str:
    return datetime.fromtimestamp(expiry, UTC).isoformat()


def token_problem(token: AccessToken, authority_key: RSAPublicKey, now: float | None = None) -> str | None:
    """What is wrong with this token (unparsable expiry, expired, not the authority's signature), or None if valid."""
    try:
        expiry = token_expiry(token)
    except (ValueError, OverflowError) as error:
        return f"the access token's expiry is unreadable ({type(error).__name__})"
    left = expiry - (get_dht_time() if now is None else now)
    if left <= 0:
        return f"the access token expired {-left:.0f} s ago"
    if not authority_key.verify(
        token_payload(token.username, token.public_key, token.expiration_time), token.signature
    ):
        return "the access token is not signed by this run's authority"
    return None


def verify_token(token: AccessToken, authority_key: RSAPublicKey, now: float | None = None) -> bool:
    """True if the authority signed this token and it has not expired."""
    return token_problem(token, authority_key, now) is None


def encode_token(token: AccessToken) -> str:
    return base64.b64encode(token.SerializeToString()).decode()


def decode_token(text: str) -> AccessToken:
    return AccessToken.FromString(base64.b64decode(text))


def read_private_key(path: str | Path) -> RSAPrivateKey:
    """An RSA key stored in hivemind's own format (DER, as ``RSAPrivateKey.to_bytes`` writes it)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": Path(path).read_bytes()})  # hivemind's unpickling path
    return key


def write_private_key(path: str | Path, key: RSAPrivateKey) -> None:
    """Write a key readable by its owner only, atomically (a half-written key would lock the owner out)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key.to_bytes())
    tmp.replace(path)


def read_secrets(path: str | Path) -> list[str]:
    """The secrets in a run secret file: one a line; blank lines and lines starting with '#' are skipped."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    for secret in found:
        if len(secret) < 16:
            raise ValueError(f"{path}: a run secret must be at least 16 characters long (e.g. openssl rand -hex 32)")
    if not found:
        raise ValueError(f"{path} holds no secret (one a line; create one with: openssl rand -hex 32 > {path})")
    return found


def identity_peer_id(identity_path: str | Path) -> PeerID:
    """The libp2p peer id of an identity file, created first if missing (so it is known before the DHT starts)."""
    if not os.path.isfile(identity_path):
        P2P.generate_identity(str(identity_path))
    return PeerID.from_identity(Path(identity_path).read_bytes())


MAX_SUBJECTS = 4096


class RateLimitedWarning:
    """Logs a warning about one subject at most once every ``period`` seconds (a refused flood stays readable)."""

    def __init__(self, log: logging.Logger, period: float = 30.0):
        self.log, self.period, self._last = log, period, {}

    def __call__(self, subject: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(subject, -self.period) >= self.period:
            self._last.pop(subject, None)
            self._last[subject] = now
            while len(self._last) > MAX_SUBJECTS:  # subjects can be strangers' peer ids: remember the newest few
                self._last.pop(next(iter(self._last)))
            self.log.warning(message)
